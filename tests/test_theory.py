"""Theory checks: MHA with/without output projection, DDPM reverse conditional, DDIM marginals, DDPM vs DDIM on
1-D Gaussian data (a)-(h), OU denoising score matching, DPO (a)-(g). Monte Carlo checks are seeded and accept
|error| <= 5 standard errors; each test also shows that the wrong formula (the natural mistake) is rejected by the
same check."""

import math

import pytest
import torch

from common import make_config
from common.checks import Check
from fm import theory_dpo
from fm.attention import MultiHeadSelfAttention
from fm.mha_variants import MHA1, MHA2, count_parameters, mha1_from_gpt2_attention, mha1_to_mha2, mha_param_formula
from fm.theory_mha import mha_checks
from gm import theory_ddim, theory_gauss, theory_ou, theory_reverse
from gm.diffusion import GaussianDiffusion, beta_schedule
from gm.theory_config import PRESETS, TheoryConfig

F64 = torch.float64


@pytest.fixture(scope="module")
def betas():
    return beta_schedule("linear", 1000)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(timesteps=1000, beta_start=1e-4, beta_end=2e-2)


def assert_all_pass(checks):
    failed = [c.row() for c in checks if not c.passes()]
    assert not failed, failed


# -------------------------------------------------------------------------------------------------------- MHA
@pytest.mark.parametrize("causal", [False, True])
def test_mha2_with_mapped_values_equals_mha1(causal):
    torch.manual_seed(0)
    mha1 = MHA1(d_q=12, d_k=12 if causal else 10, d_v=9, d_attn=5, d_head=3, d_out=7, n_heads=4).double()
    mha2 = mha1_to_mha2(mha1)
    q = torch.randn(2, 6, 12, dtype=F64)
    k = q if causal else torch.randn(2, 8, 10, dtype=F64)
    v = torch.randn(2, q.shape[1] if causal else 8, 9, dtype=F64)
    expected = mha1(q, k, v, causal=causal)
    torch.testing.assert_close(mha2(q, k, v, causal=causal), expected, rtol=0, atol=1e-12)
    # W^O cut into interleaved rows instead of contiguous row blocks: a different function
    wrong = mha1_to_mha2(mha1)
    with torch.no_grad():
        wrong.w_v.copy_(mha1.w_v @ mha1.w_o.view(3, 4, 7).transpose(0, 1))
    assert (wrong(q, k, v, causal=causal) - expected).abs().max() > 1e-2


def test_mha1_matches_the_package_attention_block():
    torch.manual_seed(1)
    block = MultiHeadSelfAttention(32, 4, block_size=8, bias=False).double().eval()
    x = torch.randn(3, 8, 32, dtype=F64)
    mha1 = mha1_from_gpt2_attention(block)
    with torch.no_grad():
        torch.testing.assert_close(mha1(x, x, x, causal=True), block(x)[0], rtol=0, atol=1e-12)
    assert count_parameters(mha1) == count_parameters(block) == 4 * 32 * 32
    with pytest.raises(ValueError, match="bias"):
        mha1_from_gpt2_attention(MultiHeadSelfAttention(32, 4, block_size=8, bias=True))


def test_mha_parameter_counts_match_formula():
    dims = {"d_q": 512, "d_k": 512, "d_v": 512, "d_attn": 64, "d_out": 512, "n_heads": 8}
    formula = mha_param_formula(d_head=64, **dims)
    assert count_parameters(MHA1(d_head=64, **dims)) == formula["MHA1"] == 1_048_576
    assert count_parameters(MHA2(**dims)) == formula["MHA2"] == 2_621_440
    assert formula["MHA2 - MHA1"] == 8 * (512 * 512 - 64 * (512 + 512)) == 1_572_864
    odd = {"d_q": 7, "d_k": 5, "d_v": 6, "d_attn": 3, "d_out": 4, "n_heads": 2}
    assert count_parameters(MHA1(d_head=2, **odd)) == mha_param_formula(d_head=2, **odd)["MHA1"]
    assert count_parameters(MHA2(**odd)) == mha_param_formula(d_head=2, **odd)["MHA2"]


def test_mha_checks_of_the_notebook_pass():
    checks = mha_checks(d_model=64, d_head=16, seed=1)
    assert_all_pass(checks)
    rank = next(c for c in checks if "rank" in c.quantity)
    assert rank.measured == 16 < 64  # the mapped value maps are far from full rank


def test_mha_rejects_bad_shapes():
    mha = MHA1(8, 8, 8, 4, 4, 8, 2)
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="V must have shape"):
        mha(x, x, torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="mismatch"):
        mha(x, x, torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="n_heads"):
        MHA2(8, 8, 8, 4, 8, 0)


# ----------------------------------------------------------------------------- Problem 1: reverse conditional
def test_posterior_closed_forms_agree_with_each_other_and_gm_diffusion(betas, diffusion):
    assert_all_pass([theory_reverse.posterior_form_agreement(betas, n=64),
                     *theory_reverse.posterior_vs_diffusion(betas, diffusion)])
    assert theory_reverse.posterior_closed_form(betas, 1) == pytest.approx((1.0, 0.0, 0.0))  # one step back: x_0


def test_reverse_conditional_monte_carlo(betas):
    checks = theory_reverse.reverse_conditional_mc(betas, (2, 10, 50), n=40_000, seed=3)
    assert_all_pass(checks)
    # the natural mistake, variance beta_t instead of beta_tilde_t, is rejected at small t by a wide margin
    var_t2 = next(c for c in checks if c.quantity == "t=2: variance beta_tilde")
    assert abs(var_t2.measured - betas[1].item()) > 50 * var_t2.stderr
    with pytest.raises(ValueError, match="2.."):
        theory_reverse.reverse_conditional_mc(betas, (1,), n=1000)


# -------------------------------------------------------------------------------------- Problem 2: DDIM family
def test_ddim_family_keeps_the_marginals_and_the_control_fails(betas, diffusion):
    alphas = theory_reverse.alphas_cumprod(betas)[1:][diffusion.ddim_timesteps(20)]
    checks, variances = theory_ddim.ddim_marginal_checks(alphas, n=20_000, seed=5)
    control = [c for c in checks if "must fail" in c.quantity]
    assert_all_pass([c for c in checks if c not in control])
    assert len(control) == 1 and not control[0].passes()
    assert len(variances) == len(theory_ddim.SIGMA_FAMILIES) + 1


def test_ddim_family_rejects_inadmissible_sigma(betas):
    alphas = theory_reverse.alphas_cumprod(betas)[1:][::100]
    too_big = theory_ddim.ddim_family_sigmas(alphas, theory_ddim.SIGMA_FAMILIES[3]) * 1.01
    with pytest.raises(ValueError, match="inadmissible"):
        theory_ddim.ddim_marginals_mc(alphas, too_big, n=1000)
    with pytest.raises(ValueError, match="unknown sigma family"):
        theory_ddim.ddim_family_sigmas(alphas, "eta=2")


def test_gm_diffusion_ddim_sampler_is_a_member_of_the_family(diffusion):
    assert_all_pass(theory_ddim.ddim_sampler_in_family(diffusion, steps=10, n=256))


# ---------------------------------------------------------------------- 1-D Gaussian: mean only / DDPM / DDIM
def test_gaussian_reverse_variances_sigma4_vs_sigma2():
    sigma2 = 0.05
    result = theory_gauss.gaussian_reverse_experiment(sigma2, steps=200, n=20_000, seed=7)
    assert_all_pass(result.checks)
    var = {row["sampler"]: row["Var(x_0) simulated"] for row in result.table}
    assert var["mean only"] < 0.1 * sigma2  # ~ sigma^4: far too narrow
    for sampler in ("DDPM, noise var dt", "DDPM, exact posterior var"):
        assert 0.9 * sigma2 < var[sampler] < 1.1 * sigma2
    assert 0.8 * sigma2 < var["DDIM"] < sigma2 / (1 + sigma2)  # discrete DDIM shrinks a little more than its limit
    # exact posterior variances from N(0, 1) land on the continuum limit at any T (only X_1's variance is off)
    a, v = theory_gauss.reverse_coefficients(sigma2, 50, "DDPM, exact posterior var")
    limit = theory_gauss.reverse_variance_limit(sigma2, "DDPM, exact posterior var")
    assert theory_gauss.reverse_variance_exact(a, v)[0].item() == pytest.approx(limit, rel=1e-12)
    assert theory_gauss.reverse_variance_exact(a, v, start_var=1 + sigma2)[0].item() == pytest.approx(sigma2, rel=1e-12)


def test_gaussian_forward_marginals_and_reverse_conditional():
    checks = theory_gauss.forward_checks(0.05, steps=200, n=20_000, seed=8)
    assert_all_pass(checks)
    # (c)'s approximation Var ~ dt: the exact factor 1 - dt / (sigma^2 + t) is within dt / sigma^2 of 1
    assert all(abs(c.derived - 1) < (1 / 200) / 0.05 for c in checks if "/ dt" in c.quantity)


def test_denoiser_regression_recovers_the_conditional_mean():
    checks = theory_gauss.denoiser_regression_checks(0.05, n=40_000, seed=9)
    assert_all_pass(checks)
    # the naive guess g = x_t (no shrinkage) is rejected at every t
    slopes = [c for c in checks if "coefficient of x_t," in c.quantity]
    assert all(abs(c.measured - 1) > 20 * c.stderr for c in slopes)


def test_eta_expansion_to_second_order():
    checks = theory_gauss.eta_expansion_checks((1e-2, 1e-3, 1e-4))
    assert_all_pass(checks)
    # the first-order expansion 1/2 + dt/(8t) leaves an error of order (dt/t)^2, not (dt/t)
    h = 1e-3
    assert abs(1 / (1 + math.sqrt(1 - h)) - 0.5 - h / 8) < h**2 / 8


# ----------------------------------------------------------------------------------- Problem 3: OU and DSM
def test_ou_marginals_and_loss_at_optimum():
    checks = theory_ou.ou_marginal_mc((0.5,), n=20_000, dt=5e-3, seed=11)
    checks += theory_ou.ou_loss_at_optimum_checks(1.0, (1e-1, 1e-2), n=50_000, seed=12)
    assert_all_pass(checks)
    closed, mc, se = theory_ou.ou_dsm_at_optimum(torch.tensor([1e-3, 0.1, 2.0], dtype=F64), n=20_000, seed=13)
    assert ((mc - closed).abs() <= 5 * se).all()
    assert closed[0] > 900  # ~ 1/t: lambda = 1 cannot be integrated down to t = 0


def test_ou_loss_gap_is_m_squared():
    for m in (0.1, 0.3):
        gap = theory_ou.ou_loss_gap(m, 1.0, n=50_000, seed=17)
        assert gap.passes()
        assert abs(gap.measured - m) > 5 * gap.stderr  # m (not m^2) would be rejected


def test_singular_reverse_ode_converges_at_order_one_half():
    euler, exact = theory_ou.ou_ode_log_gain(0.1, 1.0, steps=100_000)
    assert euler == pytest.approx(exact, rel=1e-2)
    assert exact == pytest.approx(0.1 * math.atanh(math.sqrt(1 - math.exp(-1))), rel=1e-12)
    _, _, checks = theory_ou.ou_ode_convergence(0.1, 1.0, (100, 1_000, 10_000), t_start=0.25)
    assert_all_pass(checks)


def test_optimal_denoiser_is_the_true_score():
    assert_all_pass(theory_ou.ou_optimal_denoiser((0.25, 1.0), n=20_000, seed=19))


# -------------------------------------------------------------------------------------------------- DPO
def test_dpo_optimal_policy_and_reward_reparameterisation():
    checks = theory_dpo.kl_minimiser_check(seed=1) + theory_dpo.optimal_policy_checks(vocab=2, length=4, seed=1)
    assert_all_pass(checks)
    replies, pi_ref, reward = theory_dpo.toy_problem(2, 4, seed=1)
    assert len(replies) == 2**4 and torch.allclose(pi_ref.sum(), torch.ones((), dtype=F64))
    # a policy that ignores the KL (all mass on the best reply) scores lower than pi*
    pi_star, log_z = theory_dpo.optimal_policy(pi_ref, reward, beta=0.5)
    greedy = torch.full_like(pi_ref, 1e-12).index_fill(0, reward.argmax(), 1.0)
    assert theory_dpo.rlhf_objective(greedy / greedy.sum(), pi_ref, reward, 0.5) < 0.5 * log_z
    assert theory_dpo.log10_reply_count(50257, 1024) == pytest.approx(4814.03, abs=0.01)


def test_dpo_bradley_terry_cancels_z_and_dpo_recovers_pi_star():
    assert_all_pass(theory_dpo.bradley_terry_checks(vocab=3, length=2, beta=0.3, seed=2))


def test_dpo_gradient_and_its_weighting():
    checks = theory_dpo.dpo_gradient_checks(n_pairs=16, vocab=3, length=2, beta=0.2, seed=3)
    assert_all_pass(checks)
    # the weight is sigma(r_l - r_w), not sigma(r_w - r_l): at a correctly ranked pair it is below 1/2
    logp = torch.tensor([-1.0, -3.0], dtype=F64)
    ref = torch.tensor([-2.0, -2.0], dtype=F64)
    r_hat = 0.2 * (logp - ref)
    assert torch.sigmoid(r_hat[1] - r_hat[0]) < 0.5


def test_plackett_luce_cancels_z():
    checks = theory_dpo.plackett_luce_checks(k=3, n_prompts=5, seed=4)
    assert_all_pass(checks)
    scores = torch.tensor([2.0, 0.0, -1.0], dtype=F64)
    best_first = theory_dpo.plackett_luce_logprob(scores, torch.tensor([0, 1, 2]))
    worst_first = theory_dpo.plackett_luce_logprob(scores, torch.tensor([2, 1, 0]))
    assert best_first > worst_first
    with pytest.raises(ValueError, match=">= 1"):
        theory_dpo.all_replies(0, 3)


# ------------------------------------------------------------------------------------------------- config
def test_check_tolerances_and_rows():
    mc = Check("P", "a|b", derived=1.0, measured=1.3, stderr=0.05)
    assert mc.z == pytest.approx(6.0) and not mc.passes() and mc.passes(z_max=7.0)
    exact = Check("P", "q", derived=0.0, measured=1e-10)
    assert exact.z is None and exact.passes() and not Check("P", "q", 0.0, 1e-8).passes()
    assert mc.row()["quantity"] == "a\\|b" and exact.row()["MC std err"] == "exact"


def test_config_presets_and_validation():
    assert make_config(TheoryConfig, PRESETS, profile="smoke").n_samples < make_config(
        TheoryConfig, PRESETS, profile="quick").n_samples
    with pytest.raises(ValueError, match="n_samples"):
        make_config(TheoryConfig, PRESETS, profile="smoke", n_samples=10)
    with pytest.raises(ValueError, match="unknown config key"):
        make_config(TheoryConfig, PRESETS, profile="smoke", samples=10)
