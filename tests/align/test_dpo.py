"""DPO: the loss by hand, its gradient at the reference, answer log-probs, and whole runs
(full and LoRA) that learn a preference, resume exactly and write what they promise."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge.align import dpo
from lmforge.align.preference import EncodedPair, pair_batch
from lmforge.config import DPOConfig, LoRAConfig, ModelConfig, PreferenceSourceConfig
from lmforge.model.transformer import GPT
from lmforge.train.metrics import read_metrics


def test_dpo_loss_by_hand():
    pi_c, pi_r = torch.tensor([-5.0, -7.0]), torch.tensor([-6.0, -6.5])
    ref_c, ref_r = torch.tensor([-5.5, -7.0]), torch.tensor([-6.0, -6.0])
    # margins: (0.5 - 0) = 0.5 and (0 - (-0.5)) = 0.5 ... second: (-7 - -7) - (-6.5 - -6) = 0.5
    beta = 0.2
    want = [-math.log(1 / (1 + math.exp(-beta * 0.5)))] * 2
    torch.testing.assert_close(dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta), torch.tensor(want))
    eps = 0.1
    smooth = [(1 - eps) * w + eps * -math.log(1 / (1 + math.exp(beta * 0.5))) for w in want]
    got = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing=eps)
    torch.testing.assert_close(got, torch.tensor(smooth))
    ipo = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, loss="ipo")
    torch.testing.assert_close(ipo, torch.tensor([(0.5 - 1 / (2 * beta)) ** 2] * 2))


def test_gradient_at_the_reference():
    """Policy = reference: loss log 2, zero implicit rewards, and the gradient pushes the chosen
    log-prob up and the rejected one down by beta/2 each; identical answers give no gradient."""
    pi = torch.tensor([-4.0, -9.0], requires_grad=True)
    ref = pi.detach().clone()
    beta = 0.3
    loss = dpo.dpo_loss(pi[:1], pi[1:], ref[:1], ref[1:], beta).sum()
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2))
    torch.testing.assert_close(pi.grad, torch.tensor([-beta / 2, beta / 2]))
    stats = dpo.preference_stats(pi.detach(), ref, beta)
    assert stats["margin"].item() == 0 and stats["reward_chosen"].item() == 0

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, dim=16, n_layer=1, n_head=2, max_seq_len=32))
    same = EncodedPair([1, 2, 3], [4, 5, 6], [4, 5, 6])
    ids, mask, _ = pair_batch([same], pad_id=0)
    lp = dpo.answer_logps(model, ids, mask)
    dpo.dpo_loss(lp[:1], lp[1:], lp[:1].detach(), lp[1:].detach(), 0.1).sum().backward()
    # the two rows' gradients cancel (to rounding: they are summed in different orders)
    assert max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None) < 1e-7


def test_answer_logps_sum_answer_tokens_only():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, dim=16, n_layer=1, n_head=2, max_seq_len=32)).eval()
    pairs = [EncodedPair([1, 2, 3], [4, 5], [6]), EncodedPair([7], [8, 9, 10], [11, 12])]
    ids, mask, _ = pair_batch(pairs, pad_id=0)
    got = dpo.answer_logps(model, ids, mask)
    for row, (p, a) in enumerate(
        [(e.prompt, e.chosen) for e in pairs] + [(e.prompt, e.rejected) for e in pairs]
    ):
        x = torch.tensor([p + a])
        lp = F.log_softmax(model(x[:, :-1]), -1)[0]
        want = sum(lp[len(p) - 1 + j, t] for j, t in enumerate(a))
        assert got[row].item() == pytest.approx(want.item(), abs=1e-4)


def _cfg(tmp_path, **kw):
    rows = [
        {"prompt": f"Name fruit number {i}.", "chosen": "banana banana", "rejected": "stone tree"}
        for i in range(60)
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(
        sources=[PreferenceSourceConfig(path=str(path))],
        max_steps=6,
        batch_size=4,
        seq_len=48,
        max_prompt_len=24,
        lr=3e-3,
        beta=0.5,
        warmup_steps=1,
        eval_every=3,
        save_every=3,
        log_every=1,
        keep_last=5,
        val_fraction=0.2,
        device="cpu",
    )
    return DPOConfig(**(base | kw))


def test_dpo_learns_and_resumes_exactly(micro_pretrained, tmp_path):
    recipe, model_dir = micro_pretrained
    cfg = _cfg(tmp_path)
    s = dpo.run(cfg, LoRAConfig(), model_dir, tmp_path / "full")
    rows = read_metrics(tmp_path / "full" / "metrics.jsonl")
    val = [r for r in rows if "val_accuracy" in r]
    assert s["val_margin"] > 0 and val[-1]["val_accuracy"] == 1.0, val
    assert (tmp_path / "full" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "full" / "curves.png").is_file()

    # a run that stopped after its step-3 checkpoint, resumed to the end, gives the same losses
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    shutil.rmtree(resumed / "model")
    s2 = dpo.run(cfg, LoRAConfig(), model_dir, resumed)
    rows2 = read_metrics(resumed / "metrics.jsonl")
    assert [r["loss"] for r in rows2 if "loss" in r] == [r["loss"] for r in rows if "loss" in r]
    assert s2["val_margin"] == s["val_margin"]


def test_dpo_with_lora_changes_only_the_adapter(micro_pretrained, tmp_path):
    from safetensors.torch import load_file

    recipe, model_dir = micro_pretrained
    s = dpo.run(_cfg(tmp_path, lora_r=4, max_steps=3), LoRAConfig(), model_dir, tmp_path / "lora")
    assert s["lora_r"] == 4 and s["trainable_params"] < s["params"] / 5
    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)


def test_chosen_nll_is_the_per_token_mean():
    pi_c = torch.tensor([-6.0, -2.0])  # summed over 3 and 1 answer tokens
    got = dpo.chosen_nll(pi_c, torch.tensor([3, 1]), mean=False)
    assert got.item() == pytest.approx((6 / 3 + 2 / 1) / 2)
    assert dpo.chosen_nll(pi_c, torch.tensor([3, 1]), mean=True).item() == pytest.approx(4.0)
