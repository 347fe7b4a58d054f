"""`lmforge plan` (lmforge/plan.py): the closed-form optimum against a brute-force minimisation
of the same loss, parameter counts against the real model, the data-limited case, the hours
path with a stubbed measurement, the recipe it prints, the CLI and its errors."""

import json
import math
import subprocess
import sys

import pytest
import yaml

from lmforge import plan as p
from lmforge.config import ConfigError, ModelConfig
from lmforge.model.transformer import GPT, num_params


@pytest.mark.parametrize("fit", sorted(p.FITS))
@pytest.mark.parametrize("flops", [1e13, 1e18, 5.76e23])
def test_closed_form_optimum_equals_a_brute_force_search(fit, flops):
    f = p.FITS[fit]
    n, d = f.optimum(flops)
    assert math.isclose(6 * n * d, flops, rel_tol=1e-9)
    grid = [10 ** (x / 2000) for x in range(4000, 26000)]  # N from 1e2 to 1e13, 0.1% steps
    best = min(grid, key=lambda m: f.loss(m, flops / (6 * m)))
    assert math.isclose(best, n, rel_tol=0.002)


def test_the_hoffmann_fit_puts_a_32b_model_at_chinchillas_budget():
    n, d = p.FITS["hoffmann"].optimum(5.76e23)  # Chinchilla's compute: approach 3 says ~40B
    assert 3e10 < n < 4e10 and 85 < d / n < 100  # (Hoffmann et al. Table 3 rounds to 40B)


@pytest.mark.parametrize("n_layer,dim,vocab", [(1, 64, 8192), (4, 192, 8192), (6, 384, 49152)])
def test_count_params_is_the_models_own_count(n_layer, dim, vocab):
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layer=n_layer, n_head=dim // 64, max_seq_len=64)
    assert p.count_params(n_layer, dim, vocab) == num_params(GPT(cfg))


@pytest.mark.parametrize("n", [3e6, 1.4e8, 7e9])
def test_shape_hits_the_size(n):
    n_layer, dim = p.shape_for(n, 8192)
    got = p.count_params(n_layer, dim, 8192)
    assert dim % 64 == 0 and abs(math.log(got / n)) < math.log(1.35), (n_layer, dim, got)


def test_below_the_smallest_model_the_plan_says_so():
    pl = p.plan(1e12, 8192)  # N_opt ~ 70 k: less than a 64-wide embedding of 8192 tokens
    assert pl.too_small and (pl.n_layer, pl.dim) == (1, 64)
    assert not p.plan(1e16, 8192).too_small


def test_a_data_budget_caps_the_tokens_and_grows_the_model():
    free = p.plan(1e16, 8192)
    capped = p.plan(1e16, 8192, data_tokens=5e6, epochs=2)
    assert not free.data_limited and capped.data_limited
    assert capped.d == 1e7 and math.isclose(capped.n, 1e16 / 6e7) and capped.n > free.n
    assert p.plan(1e16, 8192, data_tokens=1e12).d == free.d  # enough data: no change


def test_the_recipe_builds_the_planned_model():
    pl = p.plan(3e18, 8192, seq_len=512)
    doc = yaml.safe_load(pl.recipe())
    cfg = ModelConfig(vocab_size=8192, **doc["model"])
    assert p.count_params(cfg.n_layer, cfg.dim, 8192) == pl.params
    assert doc["pretrain"]["max_steps"] == pl.steps and doc["pretrain"]["seq_len"] == 512
    assert doc["pretrain"]["batch_size"] * 512 == pl.batch_tokens and not pl.extrapolated
    assert abs(pl.steps * pl.batch_tokens - pl.d) / pl.d < 0.01


def test_hours_measure_this_machine_then_plan_again():
    seen = []

    def measure(n_layer, dim, vocab, seq_len, steps=3, batch_size=4):  # a made-up machine
        seen.append((n_layer, dim))
        return 2e10 if len(seen) == 1 else 5e10

    flops, rate = p.flops_for_hours(0.5, 8192, 256, "epoch", None, 1, measure, log=lambda m: None)
    assert seen[0] == (4, 192) and len(seen) == 2 and rate == 5e10 and flops == 5e10 * 1800


def test_errors_name_the_problem():
    for kwargs, msg in (
        ({"flops": -1}, "positive number of FLOPs"),
        ({"flops": 1e15, "fit": "kaplan"}, "choose one of epoch, hoffmann"),
        ({"flops": 1e15, "epochs": 5}, "--epochs must be 1..4"),
        ({"flops": 1e15, "data_tokens": 0}, "--data-tokens must be > 0"),
    ):
        with pytest.raises(ConfigError, match=msg):
            p.plan(vocab=8192, **kwargs)
    with pytest.raises(ConfigError, match="--hours must be > 0"):
        p.flops_for_hours(0, 8192, 256, "epoch", None, 1)


def test_cli_json_and_text():
    r = subprocess.run([sys.executable, "-m", "lmforge", "plan", "--flops", "1e15", "--json"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fit_name"] == "epoch" and out["extrapolated"] and out["flops"] == 1e15
    r = subprocess.run([sys.executable, "-m", "lmforge", "plan", "--flops", "1e15", "--fit",
                        "hoffmann", "--data-tokens", "1e6"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and "data-limited" in r.stdout and "max_steps:" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lmforge", "plan", "--flops", "0"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 2 and "positive number of FLOPs" in r.stderr
