"""Rollout helpers: sampled answers replay the engine, log-probs equal a hand computation."""

import torch
import torch.nn.functional as F

from lmforge.align.rollout import kl_k3, masked_mean, pad_rollouts, sample_answers, token_logprobs
from lmforge.config import ModelConfig
from lmforge.model.transformer import GPT


def _model(seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=50, dim=32, n_layer=2, n_head=2, max_seq_len=64)).eval()


def test_pad_rollouts_masks_answer_targets():
    ids, mask = pad_rollouts([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    # targets are ids[:, 1:]; answer tokens sit at target positions len(prompt)-1 ...
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]


def test_token_logprobs_equal_log_softmax_gather():
    model = _model()
    ids = torch.randint(0, 50, (3, 9))
    got = token_logprobs(model, ids, temperature=0.7)
    logits = model(ids[:, :-1]) / 0.7
    want = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sample_answers_are_seeded_and_keep_the_stop_token():
    model = _model()
    prompts = [[1, 2, 3], [4, 5]]
    a = sample_answers(model, prompts, 3, max_new_tokens=6, stop_ids=(7, 8, 9), seed=5)
    b = sample_answers(model, prompts, 3, max_new_tokens=6, stop_ids=(7, 8, 9), seed=5)
    assert a == b and len(a) == 6
    for ans in a:
        assert 1 <= len(ans) <= 7
        # a stop id can only be the last token, and an answer shorter than the limit ended on one
        assert not any(t in (7, 8, 9) for t in ans[:-1])
        assert len(ans) == 6 or ans[-1] in (7, 8, 9)
    c = sample_answers(model, prompts, 3, max_new_tokens=6, stop_ids=(7, 8, 9), seed=6)
    assert c != a


def test_kl_k3_is_zero_for_equal_policies_and_positive_otherwise():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert torch.equal(kl_k3(lp, lp), torch.zeros(3))
    assert (kl_k3(lp, lp.flip(0)) >= 0).all() and kl_k3(lp, lp.flip(0)).sum() > 0
    x = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.tensor([[True, False, True]])
    assert masked_mean(x, m).item() == 2.0
