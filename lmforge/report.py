"""REPORT.md for a run directory: what was run, on what data, how well it trained, what it says.

Built only from files the stages wrote (stage.json, manifest.json, summary.json, samples.json),
so `lmforge report RUN` can redraw it at any time, also for a half-finished run.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.stages import BY_NAME, MODEL_STAGES, RUN_ORDER


def _load(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _fmt_int(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def _duration(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 90 else f"{s:.0f} s"


def _task_name(task: str, run: Path) -> str:
    """`lm:/abs/run/data:en` -> `lm:data:en`: a data folder inside the run is named relative to it."""
    if task.startswith("lm:"):
        path, sep, lang = task[3:].rpartition(":") if ":" in task[3:] else (task[3:], "", "")
        try:
            rel = Path(path).resolve().relative_to(run.resolve())
        except ValueError:
            return task
        return f"lm:{rel.as_posix()}{sep}{lang}"
    return task


def _report_card(run: Path) -> list[str]:
    """The evaluation table (one column per evaluated model) and a bar chart of the main
    metric of each task, from the eval stage's result files."""
    st = _load(run / "eval" / "stage.json") or {}
    models = (st.get("result") or {}).get("models") or [
        d for d in MODEL_STAGES if (run / "eval" / d).is_dir()
    ]  # an unfinished stage has no list yet: the usual names, in order
    models = [m for m in models if (run / "eval" / m).is_dir()]
    if not models:
        return []
    from lmforge.eval.run import read_results

    results = {}
    for m in models:
        try:
            results[m] = {(r["task"], r["metric"]): r for r in read_results(run / "eval" / m)}
        except Exception:  # an unfinished stage: report what is there
            continue
    keys = sorted({k for rows in results.values() for k in rows})
    if not keys:
        return []
    from lmforge.safety_suite import is_safety

    def table(title: str, keys: list[tuple]) -> list[str]:
        if not keys:
            return []
        lines = [title, "", "| task | metric | n | " + " | ".join(results) + " |"]
        lines.append("|---|---|---:|" + "---:|" * len(results))
        for key in keys:
            cells = []
            for rows in results.values():
                r = rows.get(key)
                se = f" ± {r['stderr']:.3f}" if r and r.get("stderr") is not None else ""
                cells.append(f"{r['value']:.3f}{se}" if r else "-")
            n = next(rows[key]["n"] for rows in results.values() if key in rows)
            name = _task_name(key[0], run)
            lines.append(f"| {name} | {key[1]} | {n} | " + " | ".join(cells) + " |")
        return [*lines, ""]

    lines = table("## Evaluation", [k for k in keys if not is_safety(k[0])])
    lines += table("## Safety", [k for k in keys if is_safety(k[0])])
    if lines and lines[0] == "## Safety":  # only safety rows: the section keeps its place
        lines = ["## Evaluation", "", *lines]
    main = [k for k in keys if k[1] in ("acc", "accuracy", "pass@1")]
    if main:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(main), 3.2))
        width = 0.8 / len(results)
        for j, (m, rows) in enumerate(results.items()):
            xs = [i + j * width for i in range(len(main))]
            vals = [rows[k]["value"] if k in rows else 0 for k in main]
            errs = [(rows[k].get("stderr") or 0) if k in rows else 0 for k in main]
            ax.bar(xs, vals, width, yerr=errs, label=m, capsize=3)
        ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(main))])
        ax.set_xticklabels([f"{t}\n{m}" for t, m in main], fontsize=8)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run / "eval" / "report_card.png", dpi=100)
        plt.close(fig)
        lines += ["![report card](eval/report_card.png)", ""]
    return lines


def _cell(text: str) -> str:
    return text.replace("\n", " ⏎ ").replace("|", "\\|")


def _pairs_table(data: dict) -> list[str]:
    lines = [
        "| source | pairs | bad rows | truncated | dropped | train | val |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, d in data.items():
        lines.append(
            f"| {name} | {_fmt_int(d['rows'])} | {d['bad_rows']} | {d['truncated']} | {d['dropped']} "
            f"| {_fmt_int(d['train'])} | {_fmt_int(d['val'])} |"
        )
    return lines + [""]


def _preference_sections(run: Path) -> list[str]:
    """The reward model's held-out accuracy and DPO's preference metrics and judged win rate."""
    lines = []
    rm = _load(run / "reward" / "summary.json")
    if rm and "val_accuracy" in rm:
        lines += [
            "## Reward model",
            "",
            f"Bradley-Terry reward model from the SFT model, {rm['step']} steps: held-out pairwise "
            f"accuracy **{rm['val_accuracy']:.3f}** on {rm['pairs']['val']} pairs (chance 0.5), "
            f"mean margin {rm['val_margin']:.3f}.",
            "",
            *_pairs_table(rm.get("data", {})),
        ]
        if (run / "reward" / "curves.png").exists():
            lines += ["![reward model curves](reward/curves.png)", ""]
    d = _load(run / "dpo" / "summary.json")
    if d and "val_accuracy" in d:
        how = f"LoRA r={d['lora_r']}" if d.get("lora_r") else "full fine-tuning"
        lines += [
            "## Preference alignment (DPO)",
            "",
            f"DPO ({d['loss_type']}, beta {d['beta']}, {how}) from the SFT model, {d['step']} steps. "
            f"On {d['pairs']['val']} held-out pairs: preference accuracy {d['val_accuracy']:.3f}, "
            f"implicit reward chosen {d['val_reward_chosen']:.3f} vs rejected "
            f"{d['val_reward_rejected']:.3f} (margin {d['val_margin']:.3f}).",
            "",
        ]
        j = d.get("judge")
        if j:
            lines += [
                f"Judged by the reward model on {j['prompts']} held-out prompts (greedy answers): "
                f"DPO wins **{j['win_rate']:.3f}** against the SFT model (ties half); mean reward "
                f"{j['policy_reward']:.3f} vs {j['reference_reward']:.3f}.",
                "",
                "| prompt | SFT answer | reward | DPO answer | reward |",
                "|---|---|---:|---|---:|",
            ]
            for e in j.get("examples", []):
                lines.append(
                    f"| {_cell(e['prompt'][:120])} | {_cell(e['reference'])} | {e['reference_reward']:.2f} "
                    f"| {_cell(e['policy'])} | {e['policy_reward']:.2f} |"
                )
            lines.append("")
        if (run / "dpo" / "curves.png").exists():
            lines += ["![DPO curves](dpo/curves.png)", ""]
    return lines


def _quantize_section(run: Path) -> list[str]:
    """Each quantized model: file size and held-out bits per byte before and after."""
    done = ((_load(run / "quantize" / "stage.json") or {}).get("result") or {}).get("models")
    if not done:
        return []
    langs = sorted({lang for q in done.values() for lang in q["val_after"]})
    lines = [
        "## Quantization",
        "",
        "Weight-only quantization of the run's final model; bits per byte on the held-out "
        "shards (float → quantized).",
        "",
        "| model | file | " + " | ".join(f"{lang} bpb" for lang in langs) + " |",
        "|---|---:|" + "---:|" * len(langs),
    ]
    for name, q in done.items():
        cells = []
        for lang in langs:
            b, a = q["val_before"].get(lang), q["val_after"].get(lang)
            cells.append(
                f"{b['bpb']:.3f} → {a['bpb']:.3f} ({100 * (a['bpb'] / b['bpb'] - 1):+.1f}%)"
                if a and b
                else "-"
            )
        lines.append(f"| {name} | {q['file_bytes'] / 1e6:.0f} MB | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(run_dir: str | Path) -> Path:
    run = Path(run_dir)
    lines = [f"# lmforge run: `{run.name}`", ""]

    # --- stages
    rows = []
    total = 0.0
    for stage in RUN_ORDER:
        st = _load(run / stage / "stage.json") or {}
        if st:
            secs = st.get("seconds", 0.0)
            total += secs
            rows.append(
                f"| {stage} | {'done' if st.get('done') else 'unfinished'} | {_duration(secs) if secs else '-'} | `{st.get('hash', '')}` |"
            )
    if rows:
        lines += [
            "## Stages",
            "",
            "| stage | status | time | config hash |",
            "|---|---|---|---|",
            *rows,
            f"| **total** | | {_duration(total)} | |",
            "",
        ]

    # --- the model the run started from, when it was not pretrained here
    base = (_load(run / "base" / "stage.json") or {}).get("result")
    if base:
        cfg = _load(Path(base["model"]) / "config.json") or {}
        prov = _load(Path(base["model"]) / "provenance.json") or {}
        shape = (
            f"{cfg.get('model_type', '?')}, {cfg.get('num_hidden_layers')} layers, width "
            f"{cfg.get('hidden_size')}, vocabulary {_fmt_int(cfg.get('vocab_size'))}"
        )
        src = ""
        if prov.get("source"):
            src = f" (from `{Path(prov['source']).name}`, sha256 `{prov.get('sha256', '?')[:12]}…`)"
        lines += [
            "## Base model",
            "",
            f"`{base['model']}`: {shape}{src}.",
            "",
        ]

    # --- cleaning
    cleaned = _load(run / "clean" / "report.json")
    if cleaned:
        lines += [
            "## Cleaning",
            "",
            f"{_fmt_int(cleaned['docs_out'])} of {_fmt_int(cleaned['docs_in'])} documents kept "
            f"({cleaned['bytes_out'] / 1e6:.1f} of {cleaned['bytes_in'] / 1e6:.1f} MB); "
            f"examples of what each rule removed are in `clean/report.md`.",
            "",
            "| step | docs in | removed | by rule |",
            "|---|---:|---:|---|",
        ]
        for name, st in cleaned["steps"].items():
            rules = ", ".join(f"{k} {_fmt_int(v)}" for k, v in list(st["removed"].items())[:6])
            lines.append(
                f"| {name} | {_fmt_int(st['docs_in'])} | "
                f"{_fmt_int(st['docs_in'] - st['docs_kept'])} | {rules or '-'} |"
            )
        lines.append("")

    # --- data
    manifest = _load(run / "data" / "manifest.json")
    if manifest:
        lines += [
            "## Data",
            "",
            f"Tokenizer `{manifest.get('tokenizer_fingerprint', manifest.get('tokenizer_hash', '?'))}`, "
            f"vocabulary {manifest.get('vocab_size')}, shards of `{manifest.get('dtype')}`.",
            "",
            "| source | lang | train docs | train tokens | val docs | val tokens |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for src in manifest.get("sources", []):
            tr, va = src.get("train", {}), src.get("val", {})
            lines.append(
                f"| {src.get('name')} | {src.get('lang')} | {_fmt_int(tr.get('docs'))} | {_fmt_int(tr.get('tokens'))} "
                f"| {_fmt_int(va.get('docs'))} | {_fmt_int(va.get('tokens'))} |"
            )
        lines.append("")
        if any("mixture" in src for src in manifest.get("sources", [])):
            from lmforge.data.prepare import realised_mixture

            lines += [
                "Mixture (training tokens as written, each source repeated or subsampled):",
                "",
                "| source | tokens | share | epochs |",
                "|---|---:|---:|---:|",
            ]
            for r in realised_mixture(manifest):
                lines.append(
                    f"| {r['name']} | {_fmt_int(r['tokens'])} | {r['share']:.1%} | {r['epochs']:.2f} |"
                )
            lines.append("")
    tstats = _load(run / "tokenizer" / "stats.json")
    if tstats and tstats.get("bytes_per_token"):
        bpt = ", ".join(f"{lang}: {v:.2f}" for lang, v in tstats["bytes_per_token"].items())
        lines += [f"Tokenizer bytes per token on validation text — {bpt}.", ""]

    # --- training
    summary = _load(run / "pretrain" / "summary.json")
    if summary:
        m = summary.get("model", {})
        lines += [
            "## Pretraining",
            "",
            f"Model: {m.get('n_layer')} layers, width {m.get('dim')}, {m.get('n_head')} heads "
            f"({m.get('n_kv_head')} key/value), context {m.get('max_seq_len')}, "
            f"{_fmt_int(summary.get('params'))} parameters. {summary.get('step')} of {summary.get('max_steps')} steps "
            f"of {_fmt_int(summary.get('tokens_per_step'))} tokens on {summary.get('device')}.",
            "",
        ]
        if summary.get("tokens_per_s"):
            lines += [
                f"Throughput (median of logged intervals): {summary['tokens_per_s']:,.0f} tokens/s, "
                f"MFU {100 * summary.get('mfu', 0):.1f}% of the measured matmul peak "
                f"({summary.get('peak_flops', 0) / 1e9:.0f} GFLOP/s).",
                "",
            ]
        if summary.get("val"):
            lines += [
                "| validation | loss (nats/token) | bits per byte | tokens |",
                "|---|---:|---:|---:|",
            ]
            for lang, r in summary["val"].items():
                lines.append(
                    f"| {lang} | {r['loss']:.3f} | {r['bpb']:.3f} | {_fmt_int(r.get('tokens'))} |"
                )
            lines.append("")
        if (run / "pretrain" / "loss.png").exists():
            lines += ["![loss curve](pretrain/loss.png)", ""]

    # --- instruction tuning
    sft = _load(run / "sft" / "summary.json")
    if sft:
        lora = sft.get("lora")
        how = f"LoRA r={lora['r']} on {', '.join(lora['targets'])}" if lora else "full fine-tuning"
        lines += [
            "## Instruction tuning (SFT)",
            "",
            f"{how}: {_fmt_int(sft.get('trainable_params'))} of {_fmt_int(sft.get('params'))} "
            f"parameters trained, {sft.get('step')} of {sft.get('max_steps')} steps; "
            f"held-out loss on assistant replies {sft.get('val_loss', float('nan')):.3f} nats/token"
            + (f", {sft['tokens_per_s']:,.0f} tokens/s." if sft.get("tokens_per_s") else "."),
            "",
            "| source | rows | bad rows | truncated | dropped | train | val | reply tokens |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, d in sft.get("data", {}).items():
            lines.append(
                f"| {name} | {_fmt_int(d['rows'])} | {d['bad_rows']} | {d['truncated']} "
                f"| {d['dropped']} | {_fmt_int(d['train'])} | {_fmt_int(d['val'])} "
                f"| {_fmt_int(d['reply_tokens'])} |"
            )
        lines.append("")
        by_source = sft.get("val_loss_by_source") or {}
        if by_source:
            lines += [
                "Held-out reply loss (nats/token) of each source before and after SFT:",
                "",
                "| source | before | after | change |",
                "|---|---:|---:|---:|",
            ]
            for name, v in by_source.items():
                lines.append(
                    f"| {name} | {v['before']:.3f} | {v['after']:.3f} "
                    f"| {v['after'] - v['before']:+.3f} |"
                )
            lines.append("")
        if (run / "sft" / "loss.png").exists():
            lines += ["![SFT loss curve](sft/loss.png)", ""]

    lines += _preference_sections(run)
    lines += _quantize_section(run)

    # --- samples
    chat = _load(run / "sample" / "chat.json")
    if chat and "answers" in chat[0]:
        names = list(chat[0]["answers"])
        heads = {n: BY_NAME[n].title for n in MODEL_STAGES}
        lines += ["## Chat answers, model by model (greedy)", ""]
        lines += ["| prompt | " + " | ".join(heads.get(n, n) for n in names) + " |"]
        lines += ["|---" * (len(names) + 1) + "|"]
        for c in chat:
            cells = [_cell(c["prompt"])] + [_cell(c["answers"][n]) for n in names]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    samples = _load(run / "sample" / "samples.json")
    if samples:
        lines += ["## Samples", ""]
        for s in samples:
            text = s["completion"].replace("\n", " ⏎ ")
            lines += [f"**{s['prompt']}**{text}", ""]

    # --- evaluation
    lines += _report_card(run)

    # --- config
    recipe = _load(run / "recipe.json")
    if recipe:
        lines += [
            "## Configuration",
            "",
            "```json",
            json.dumps(recipe, indent=1, ensure_ascii=False),
            "```",
            "",
        ]
    path = run / "REPORT.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
