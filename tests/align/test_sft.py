"""SFT: chat template parity with transformers, the exact loss mask, bad rows, padding, resume."""

import gzip
import json

import numpy as np
import pytest
import torch

from lmforge.align.sft import (
    IGNORE,
    encode_example,
    masked_nll,
    pad_batch,
    read_source,
    row_to_messages,
    run,
)
from lmforge.config import ConfigError, LoRAConfig, SFTSourceConfig, build
from lmforge.data.batches import BatchPlan
from lmforge.data.readers import DataError
from lmforge.infer.chat import fit_history
from lmforge.model.checkpoint import load_model
from lmforge.tokenizer import Tokenizer, render_chat

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "你好吗？"},
    {"role": "assistant", "content": "很好。"},
]


@pytest.fixture(scope="module")
def tok(micro_prepared):
    return Tokenizer.load(micro_prepared[1] / "tokenizer")


def test_template_matches_transformers(micro_prepared, tok):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(micro_prepared[1] / "tokenizer")
    for msgs in (CONVERSATION, CONVERSATION[:2], CONVERSATION[1:3]):
        for gen in (False, True):
            text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert tok.render_chat(msgs, add_generation_prompt=gen) == text
            ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert tok.encode_chat(msgs, add_generation_prompt=gen) == list(ids)


def test_other_templates_render_like_transformers():
    """Jinja semantics (trim_blocks, lstrip_blocks, loop controls, raise_exception, kwargs)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system first') }}"
        "{% endif %}\n  {% if m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% else %}"
        "<<SYS>>{{ m['content'] }}<</SYS>>{% endif %}\n{% endfor %}"
    )
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    ref, _ = render_jinja_template([CONVERSATION], chat_template=template, **special)
    assert render_chat(template, CONVERSATION, **special) == ref[0]
    with pytest.raises(ConfigError, match="system first"):
        render_chat(template, [CONVERSATION[1], CONVERSATION[0]], **special)
    with pytest.raises(ConfigError, match="not valid Jinja"):
        render_chat("{% for %}", CONVERSATION)


def test_loss_mask_is_exactly_the_replies(tok):
    ex, status = encode_example(tok, CONVERSATION, seq_len=256, overflow="truncate")
    assert status == "ok"
    ids, labels = ex
    # the inputs are the conversation (BOS first, from the template) less its last token
    assert ids[0] == tok.bos_id and list(ids) == tok.encode_chat(CONVERSATION)[:-1]
    # the targets, read as runs of consecutive trained positions, are the two replies with
    # their end-of-turn marker and newline; the prompt, system text and role headers are not
    runs, cur = [], []
    for lab in labels:
        if lab != IGNORE:
            cur.append(int(lab))
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == ["Hello!<|im_end|>\n", "很好。<|im_end|>\n"]
    # a target is the next input token: labels are inputs shifted by one where trained
    full = np.append(ids, labels[-1])
    trained = labels != IGNORE
    assert (labels[trained] == full[1:][trained]).all()
    # exactly the reply tokens are trained: everything else in the sequence is masked
    reply_ids = sum(
        (tok.encode_rendered(t) for t in ("Hello!<|im_end|>\n", "很好。<|im_end|>\n")), []
    )
    assert int(trained.sum()) == len(reply_ids)


def test_special_strings_typed_by_a_user_stay_text(tok):
    msgs = [{"role": "user", "content": "say <|im_end|> now"}]
    ids = tok.encode_chat(msgs)
    assert ids.count(tok.token_id("<|im_end|>")) == 1  # only the template's own marker
    assert tok.decode(ids).count("<|im_end|>") == 2  # the typed one is there, as text


def test_truncate_and_drop(tok):
    long = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "ok " * 50},
    ]
    ex, status = encode_example(tok, long, seq_len=64, overflow="truncate")
    assert ex is None and status == "dropped"  # truncation cut away every reply token
    short_prompt = [{"role": "user", "content": "hi"}, long[1]]
    ex, status = encode_example(tok, short_prompt, seq_len=32, overflow="truncate")
    assert status == "truncated" and ex.shape == (2, 32)
    ex, status = encode_example(tok, short_prompt, seq_len=32, overflow="drop")
    assert ex is None and status == "dropped"


def test_rows_both_formats_and_bad_rows(tmp_path):
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    assert row_to_messages(alpaca, "sys") == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "Add\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    assert row_to_messages(chat) == chat["messages"]
    bad = [
        ({"instruction": "x"}, "'output'"),
        ({"instruction": 3, "output": "y"}, "'instruction' must be a string"),
        ({"instruction": "x", "output": "  "}, "empty"),
        ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "a"}]}, "role must be one of"),
        ({"messages": [{"role": "assistant", "content": ""}]}, "empty assistant turn"),
        ({"text": "x"}, "needs 'messages'"),
    ]
    for row, msg in bad:
        with pytest.raises(ValueError, match=msg):
            row_to_messages(row)
    path = tmp_path / "data.jsonl.gz"
    lines = [json.dumps(alpaca), "{not json", json.dumps(bad[2][0]), "", json.dumps(chat)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    src = SFTSourceConfig(path=str(path))
    with pytest.raises(DataError, match=r"data\.jsonl\.gz:2: .*skip_bad_rows"):
        read_source(src, ".", "", skip_bad_rows=False)
    convs, problems = read_source(src, ".", "", skip_bad_rows=True)
    assert len(convs) == 2 and len(problems) == 2
    assert problems[0].endswith(
        ":2: invalid JSON at column 2: Expecting property name enclosed in double quotes"
    )
    assert ":3: field 'output' is empty" in problems[1]
    with pytest.raises(DataError, match="file not found"):
        read_source(SFTSourceConfig(path=str(tmp_path / "nope.jsonl")), ".", "", False)


def test_padding_never_changes_real_positions(micro_pretrained, tok):
    """Right padding: a conversation scores the same alone and batched with a longer one."""
    model = load_model(micro_pretrained[1]).eval()
    a, _ = encode_example(tok, CONVERSATION[1:3], 64, "truncate")
    b, _ = encode_example(tok, CONVERSATION, 64, "truncate")
    with torch.no_grad():
        x1, y1 = pad_batch([a], tok.pad_id)
        x2, y2 = pad_batch([a, b], tok.pad_id)
        assert x2.shape[1] > x1.shape[1] and (y2[0, x1.shape[1] :] == IGNORE).all()
        nll1, n1 = masked_nll(model(x1), y1)
        nll2, _ = masked_nll(model(x2)[:1], y2[:1])
    assert n1 > 0 and abs(nll1.item() - nll2.item()) < 1e-4


def test_batch_plan_is_a_function_of_the_index():
    lengths = list(np.random.default_rng(0).integers(5, 60, 37))
    p1, p2 = BatchPlan(lengths, 4, seed=3), BatchPlan(lengths, 4, seed=3)
    first = [p1(i) for i in range(25)]
    assert [p2(i) for i in reversed(range(25))][::-1] == first  # any order, same batches
    epoch = [i for k in range(p1.per_epoch) for i in p1(k)]
    assert sorted(epoch) == list(range(37))  # an epoch sees every example once
    assert [i for k in range(p1.per_epoch, 2 * p1.per_epoch) for i in p1(k)] != epoch


def test_sft_trains_resumes_exactly_and_reports(micro_pretrained, tmp_path):
    recipe, model_dir = micro_pretrained
    full = run(recipe.sft, LoRAConfig(), model_dir, tmp_path / "full", recipe.base_dir)
    assert full["step"] == 4 and not full["interrupted"]
    assert full["trainable_params"] == full["params"]
    assert full["data"]["alpaca_en"]["rows"] == 60
    assert (tmp_path / "full" / "model" / "model.safetensors").exists()
    # stop after 2 steps (a checkpoint is kept at step 2), then resume to 4: same losses
    half = build(type(recipe.sft), {**_plain(recipe.sft), "max_steps": 2}, "sft")
    run(half, LoRAConfig(), model_dir, tmp_path / "resumed", recipe.base_dir)
    resumed = run(recipe.sft, LoRAConfig(), model_dir, tmp_path / "resumed", recipe.base_dir)
    assert resumed["step"] == 4
    losses = [_losses(tmp_path / d / "metrics.jsonl") for d in ("full", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a = load_model(tmp_path / "full" / "model").state_dict()
    b = load_model(tmp_path / "resumed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # per-source held-out loss before and after; the resumed run kept the "before"
    for summary in (full, resumed):
        by_source = summary["val_loss_by_source"]
        assert list(by_source) == ["alpaca_en", "alpaca_zh"]
        assert all(v["after"] < v["before"] for v in by_source.values())
    assert resumed["val_loss_by_source"] == full["val_loss_by_source"]


def test_fit_history_drops_oldest_turns_not_the_system_prompt(tok):
    msgs = [CONVERSATION[0]] + [
        {"role": r, "content": f"turn {i} " + "blah " * 10}
        for i in range(6)
        for r in ("user", "assistant")
    ]
    msgs = msgs[:-1]  # ends with the newest user message
    kept, dropped = fit_history(tok, msgs, 120)
    assert kept[0] == CONVERSATION[0] and kept[-1] == msgs[-1] and dropped > 0
    assert kept == [msgs[0]] + msgs[1 + dropped :]
    with pytest.raises(ConfigError, match="system prompt and your message"):
        fit_history(tok, [CONVERSATION[0], {"role": "user", "content": "x " * 500}], 50)


def _plain(cfg) -> dict:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(cfg).items()}


def _losses(path) -> list[float]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def test_lora_sft_resumes_exactly_and_exports_a_merged_model(micro_pretrained, tmp_path):
    from lmforge.model.load import load
    from lmforge.model.lora import load_adapter

    recipe, model_dir = micro_pretrained
    lora = LoRAConfig(r=4, alpha=8, targets=["q", "v", "down"])
    full = run(recipe.sft, lora, model_dir, tmp_path / "full", recipe.base_dir)
    cfg = load_model(model_dir).cfg
    per_layer = 4 * (cfg.dim + cfg.n_head * cfg.head_dim)  # q: A (4, dim) + B (q_out, 4)
    per_layer += 4 * (cfg.dim + cfg.n_kv_head * cfg.head_dim) + 4 * (cfg.ffn_dim + cfg.dim)
    assert full["trainable_params"] == cfg.n_layer * per_layer < full["params"] / 10
    adapter = tmp_path / "full" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    half = build(type(recipe.sft), {**_plain(recipe.sft), "max_steps": 2}, "sft")
    run(half, lora, model_dir, tmp_path / "resumed", recipe.base_dir)
    run(recipe.sft, lora, model_dir, tmp_path / "resumed", recipe.base_dir)
    assert _losses(tmp_path / "full" / "metrics.jsonl") == _losses(
        tmp_path / "resumed" / "metrics.jsonl"
    )
    # the exported merged checkpoint computes what base + adapter compute
    from lmforge.cli import main

    assert main(["export", str(adapter), str(tmp_path / "merged"), "--merge-lora"]) == 0
    assert main(["export", str(adapter), str(tmp_path / "merged"), "--merge-lora"]) == 2
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        adapted = load_adapter(load_model(model_dir), adapter)(x)
        merged = load_model(tmp_path / "merged")(x)
        served, _ = load(adapter)
        assert (adapted - merged).abs().max().item() < 1e-5
        assert (served(x) - adapted).abs().max().item() < 1e-5
        assert (load_model(model_dir)(x) - adapted).abs().max().item() > 1e-3  # it did train
    # a stage that trains on from the adapter (full DPO, reward) gets every weight trainable
    # (it got the base's frozen ones, and full DPO after LoRA SFT had nothing to train)
    trainable, _ = load(adapter, trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())


def test_bos_is_added_once_whatever_the_template(tok):
    # ChatML as lmforge wrote it before BOS moved into the template (older checkpoints)
    chatml = Tokenizer(tok._tok, chat_template=tok.chat_template.removeprefix("{{ bos_token }}"))
    assert chatml.chat_prefix(CONVERSATION) == [tok.bos_id]  # no BOS in it: we add it
    assert tok.chat_prefix(CONVERSATION) == []  # ours writes it (Llama-3 style), for every tool
    no_bos = Tokenizer(tok._tok, bos_token=None, chat_template=tok.chat_template)
    assert no_bos.chat_prefix(CONVERSATION) == []  # Qwen2 style: no BOS at all
    assert tok.eos_id not in no_bos.encode_chat(CONVERSATION)  # nor the EOS stand-in
    examples = [encode_example(t, CONVERSATION, 256, "truncate")[0] for t in (chatml, tok)]
    assert list(examples[0][0][:2]).count(tok.bos_id) == 1
    assert examples[0].tolist() == examples[1].tolist()  # the same example either way


@pytest.mark.parametrize("lora_r", [0, 4])
def test_sft_on_an_imported_qwen2_checkpoint_saves_qwen2(micro_prepared, tmp_path, lora_r):
    """A transformers Qwen2 model (q/k/v biases, GQA) with our tokenizer: SFT, full or LoRA,
    and what comes out is a Qwen2 checkpoint transformers opens with our logits."""
    import transformers

    recipe, run_dir = micro_prepared
    tok = Tokenizer.load(run_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, tie_word_embeddings=True,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen2")
    tok.save(tmp_path / "qwen2")
    s = run(
        recipe.sft, LoRAConfig(r=lora_r, targets=["q", "v"]), tmp_path / "qwen2", tmp_path / "out"
    )
    assert s["step"] == recipe.sft.max_steps and s["val_loss"] < 100
    if lora_r:
        from lmforge.cli import main

        assert (
            main(
                [
                    "export",
                    str(tmp_path / "out" / "adapter"),
                    str(tmp_path / "out" / "model"),
                    "--merge-lora",
                ]
            )
            == 0
        )
    saved = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert saved["model_type"] == "qwen2" and saved["architectures"] == ["Qwen2ForCausalLM"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "model")
    ours = load_model(tmp_path / "out" / "model")
    x = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        assert (theirs(input_ids=x).logits - ours(x)).abs().max().item() < 1e-4
        before = load_model(tmp_path / "qwen2")(x)
        assert (before - ours(x)).abs().max().item() > 1e-4  # it trained


def test_resume_between_metrics_lines_and_rerun_log_the_uninterrupted_rows(
    micro_pretrained, tmp_path
):
    import shutil

    from lmforge.train.metrics import read_metrics

    recipe, model_dir = micro_pretrained
    # a checkpoint at step 3 falls between the metrics lines of steps 2 and 4
    cfg = build(type(recipe.sft), {**_plain(recipe.sft), "save_every": 3, "log_every": 2}, "sft")
    run(cfg, LoRAConfig(), model_dir, tmp_path / "full", recipe.base_dir)
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    stopped = tmp_path / "stopped"
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step_000003", stopped / "checkpoints" / "step_000003"
    )
    (stopped / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in full if r["step"] <= 3)
    )
    run(cfg, LoRAConfig(), model_dir, stopped, recipe.base_dir)
    loss = lambda rows: [(r["step"], r["loss"]) for r in rows if "loss" in r]  # noqa: E731
    assert loss(read_metrics(stopped / "metrics.jsonl")) == loss(full) and len(loss(full)) == 2
    # running the finished stage again adds no second row for its last step
    run(cfg, LoRAConfig(), model_dir, tmp_path / "full", recipe.base_dir)
    assert read_metrics(tmp_path / "full" / "metrics.jsonl") == full
