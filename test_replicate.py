"""Tests for replicate.py, the referee, written as examples of its API: baselines, intervals, verdicts,
stages 3-4 and bring-your-own-SAE. It reuses test_dualenc's tiny models and fixtures."""

import json
import math
import shutil
import threading

import pytest
import torch
import torch.nn.functional as F
import transformers

import dualenc as de
import replicate as rp
import test_dualenc
from test_dualenc import D, FEATS, K, M, interrupt_training_at, run_cli, small_cfg, synthetic_acts, tiny_llama  # noqa: F401
from test_dualenc import tiny_lm_folder, tiny_method_run  # noqa: F401 (fixtures)


def tiny_run_cfg(model, out, **kw):
    """A tiny replicate run; its activation store beside `out` (a run given the same `out` reuses it)."""
    return test_dualenc.tiny_run_cfg(model, out, cls=rp.Config, **{"store": f"{out}_store", **kw})


def test_param_counts_match_a_hand_count():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M))
    counts = rp.param_counts(model)
    assert counts == {"sae_encoder": D * FEATS + FEATS, "sae_decoder": FEATS * D + D,
                      "nfm_linear": FEATS * D, "nfm_embed": FEATS * M,
                      "nfm_mlp": (M * M + M) + M * D}  # b_dec is the one output bias
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert rp.params_used(model, ()) == counts["sae_encoder"] + counts["sae_decoder"]
    assert rp.params_used(model, de.PATHWAYS) == sum(counts.values())


def test_bimodality_statistics_separate_two_modes_from_one():
    g = torch.Generator().manual_seed(0)
    unimodal = torch.randn(4000, generator=g)
    bimodal = torch.cat([0.05 + 0.01 * torch.randn(2000, generator=g), 0.37 + 0.03 * torch.randn(2000, generator=g)])
    assert rp.bimodality_coefficient(unimodal) < 0.4 < 5 / 9 < rp.bimodality_coefficient(bimodal)
    fit = rp.gmm2(bimodal)
    assert fit["means"].tolist() == pytest.approx([0.05, 0.37], abs=0.01)
    assert fit["weights"].tolist() == pytest.approx([0.5, 0.5], abs=0.02)
    assert rp.two_modes(fit) and not rp.two_modes(rp.gmm2(unimodal))


def test_bic_prefers_two_gaussians_only_for_a_bimodal_sample():
    g = torch.Generator().manual_seed(1)
    normal = 0.4 + 0.1 * torch.randn(4000, generator=g)
    bimodal = torch.cat([0.05 + 0.02 * torch.randn(1500, generator=g), 0.37 + 0.05 * torch.randn(2500, generator=g)])
    assert rp.gmm_bic(normal) < 0 < 10 < rp.gmm_bic(bimodal)


def test_weighted_statistics_equal_the_statistics_of_the_resampled_sample():
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(300, generator=g), torch.rand(300, generator=g)
    w = rp.bootstrap_weights(300, 3, g)
    drawn = torch.repeat_interleave(torch.arange(300), w[2].long())  # resample 2 written out
    assert rp.bimodality_coefficient(x, w)[2] == pytest.approx(rp.bimodality_coefficient(x[drawn]).item(), rel=1e-9)
    assert rp.pearson(x, y, w)[2] == pytest.approx(rp.pearson(x[drawn], y[drawn]).item(), rel=1e-9)
    assert rp.bimodality_coefficient(x, w)[0] == pytest.approx(rp.bimodality_coefficient(x).item(), rel=1e-12)


def test_bootstrap_of_a_constant_is_a_point_and_widens_with_noise():
    g = torch.Generator().manual_seed(0)
    w = rp.bootstrap_weights(40, 500, g)
    assert w.shape == (501, 40) and (w[0] == 1).all() and (w.sum(-1) == 40).all()
    widths = []
    for noise in (0.0, 0.1, 1.0):
        per_window = 2.0 + noise * torch.randn(40, generator=g, dtype=torch.float64)
        s = rp.summarise((w @ per_window) / 40)
        assert s["value"] == pytest.approx(per_window.mean().item())
        widths.append(s["ci"][1] - s["ci"][0])
    assert widths[0] == pytest.approx(0.0, abs=1e-12) and 0 < widths[1] < widths[2]


def test_seed_interval_is_students_t():
    assert rp.t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-3)
    assert rp.t_quantile(0.975, 2) == pytest.approx(4.303, abs=2e-3)
    lo, hi = rp.seed_interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0) and (hi - lo) / 2 == pytest.approx(4.303 / 3 ** 0.5, abs=2e-3)
    s = rp.summarise(torch.tensor([[1.0, 0.9, 1.1], [3.0, 2.9, 3.1]]))
    assert s["value"] == 2.0 and s["per_seed"] == [1.0, 3.0] and "seed_ci" in s


@pytest.mark.parametrize("ci, seed_ci, expected", [
    ([0.30, 0.40], None, "holds"), ([0.05, 0.10], None, "no"), ([0.10, 0.30], None, "unclear"),
    ([0.30, 0.40], [0.10, 0.50], "unclear"), ([0.30, 0.40], [0.25, 0.45], "holds")])
def test_verdict_needs_every_interval_on_one_side(ci, seed_ci, expected):
    summary = {"value": sum(ci) / 2, "ci": ci, **({"seed_ci": seed_ci} if seed_ci else {})}
    assert rp.verdict(summary, 0.2, above=True) == expected


def fake_seed(R=200, seed=0, joint_kl=0.5, noise=0.01):
    """One seed's samples as analyse_seed returns them, with chosen values and bootstrap noise."""
    g = torch.Generator().manual_seed(seed)

    def sample(v):
        return v + torch.cat([torch.zeros(1), noise * torch.randn(R, generator=g)]).double()

    names = ("sae", "sae_matched", "sequential", "joint", "joint_sae_path", "joint_interaction_only", "joint_no_linear")
    models = {n: {"mse": sample(1.0), "kl": sample(1.0)} for n in names}
    models["joint"] = {"mse": sample(0.5), "kl": sample(joint_kl)}
    models["sequential"] = {"mse": sample(1.1), "kl": sample(1.0)}  # worse than the SAE
    models["joint_interaction_only"] = models["joint_no_linear"] = {"mse": sample(1.0), "kl": sample(0.9)}
    norms = {"r_sq_norm_vs_nfm_share": sample(-0.9), "bc_joint_W_dec": sample(0.7), "bc_joint_merged": sample(0.4),
             "bc_sae": sample(0.3), "delta_bic_joint_W_dec": sample(50.0), "delta_bic_joint_merged": sample(-5.0),
             "delta_bic_sae": sample(-20.0)}
    return {"models": models, "contrib": {"joint": sample(0.06)}, "norms": norms}


def test_claims_give_a_verdict_per_reading_from_their_intervals():
    rows = {c["claim"]: c["readings"] for c in rp.claims([fake_seed()])}
    assert rows["joint vs SAE, KL reduction"]["fair"]["verdict"] == "holds"
    assert rows["sequential vs SAE, reconstruction error reduction"]["paper_way"]["verdict"] == "no"
    assert rows["nonlinear part alone, share of the joint model's KL gain"]["fair"]["value"] == pytest.approx(0.2)
    assert rows["nonlinear part alone, its own KL reduction"]["fair"]["value"] == pytest.approx(0.1)
    assert rows["joint decoder sq. norms bimodal: bimodality coef."]["paper_way"]["verdict"] == "holds"
    assert rows["joint decoder sq. norms bimodal: bimodality coef."]["fair"]["verdict"] == "no"
    assert not any("parameters" in claim for claim in rows)  # the parameter share is a design figure
    # a KL reduction at the threshold, with noise: the interval straddles it
    rows = {c["claim"]: c["readings"] for c in rp.claims([fake_seed(joint_kl=1 - 0.258, noise=0.05)])}
    assert rows["joint vs SAE, KL reduction"]["fair"]["verdict"] == "unclear"
    # two seeds: the seed interval is reported beside the bootstrap one and both decide
    rows = {c["claim"]: c["readings"] for c in rp.claims([fake_seed(seed=0), fake_seed(seed=1, joint_kl=0.8)])}
    fair = rows["joint vs SAE, KL reduction"]["fair"]
    assert fair["per_seed"] == pytest.approx([0.5, 0.2]) and fair["verdict"] == "unclear"


def test_quick_run_on_smollm2_writes_complete_results(tmp_path):
    r = run_cli("replicate.py", "--quick", "--out", str(tmp_path / "run"), "--store", str(tmp_path / "store"))
    tmp_path = tmp_path / "run"
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "data", "models", "clean_ce", "zero_ce", "timings_s"} <= res.keys()
    assert res["data"]["d_model"] == 576 and res["data"]["layer"] == 15
    assert res["data"]["train_tokens"] > 10_000 and res["data"]["excluded_tokens"] >= res["config"]["tokens"] // 128
    for name in ("sae", "sae_matched", "sequential", "joint", "joint_sae_path"):
        m = res["models"][name]
        assert {"params", "mse", "fvu", "kl", "kl_eps_random", "pathology_ratio", "ce", "ce_recovered"} <= m.keys()
        assert 0 < m["fvu"] < 1 and m["kl"] > 0 and 0 < m["ce_recovered"] < 1
        for metric in ("kl", "ce", "fvu"):
            lo, hi = m["ci"][metric]
            assert lo < m[metric] < hi
    assert abs(res["models"]["sae_matched"]["params"] / res["models"]["joint"]["params"] - 1) < 0.02
    assert res["zero_ce"] > res["models"]["sae"]["ce"] > res["clean_ce"]
    for name in ("joint_linear_only", "joint_interaction_only", "joint_no_linear"):
        assert res["models"][name]["fvu"] > 0
    analysis = res["analysis"]
    assert {"interaction_share_of_nfm_output", "params", "interaction_param_share", "decoder_norms",
            "claims"} <= analysis.keys()
    assert len(analysis["claims"]) == 12
    for claim in analysis["claims"]:
        for reading in claim["readings"].values():
            assert reading["verdict"] in ("holds", "no", "unclear") and len(reading["ci"]) == 2
    assert res["status"] == "complete" and res["stages_done"][-1] == "analyse"
    peaks = list(res["peak_rss_gib"].values())  # the peak so far, stage by stage
    assert list(res["peak_rss_gib"])[:2] == ["load_extract", "train_sae"] and peaks == sorted(peaks) and peaks[0] > 0.1
    for name in rp.Config.STAGES:
        assert {"cfg.json", "sae_weights.safetensors", "normalization.safetensors"} <= {
            p.name for p in (tmp_path / name).iterdir()}
    for figure in ("curves.png", "decoder_norms.png", "models.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="session")
def tiny_run(tiny_lm_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    return out, rp.run(tiny_run_cfg(tiny_lm_folder, out))


def test_same_seed_gives_identical_results(tiny_lm_folder, tiny_run, tmp_path):
    _, first = tiny_run
    second = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path))
    assert second["models"] == first["models"] and second["curves"] == first["curves"]
    assert second["analysis"]["claims"] == first["analysis"]["claims"]


def test_eval_only_reproduces_a_saved_run(tiny_run):
    out, first = tiny_run
    again = rp.run(rp.Config(eval_only=str(out), device="cpu"))
    for name, metrics in first["models"].items():
        for metric, value in metrics.items():
            if metric != "ci":
                assert again["models"][name][metric] == pytest.approx(value, rel=1e-6, abs=1e-6)
        assert again["models"][name]["ci"]["kl"] == pytest.approx(metrics["ci"]["kl"], rel=1e-6, abs=1e-6)
    assert (out / "results_eval_only.json").exists()
    models, report = de.load_run(out, rp.Config)
    assert set(models) == set(rp.Config.STAGES) and report["status"] == "complete"


def test_interrupted_run_resumes_to_the_same_result(tiny_lm_folder, tiny_run, tmp_path, monkeypatch):
    _, uninterrupted = tiny_run
    steps = uninterrupted["data"]["steps_per_model"]
    real_step = interrupt_training_at(monkeypatch, 3 * steps + 12)  # the joint model's 12th step: checkpoint at 10
    with pytest.raises(KeyboardInterrupt):
        rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path))
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["status"] == "incomplete" and partial["stages_done"] == ["sae", "sae_matched", "sequential"]
    assert (tmp_path / "joint" / "train_state.pt").exists() and not (tmp_path / "joint" / "cfg.json").exists()
    with pytest.raises(de.DualencError, match="unfinished"):
        rp.run(rp.Config(eval_only=str(tmp_path), device="cpu"))

    monkeypatch.setattr(de, "train_step", real_step)
    resumed = rp.run(rp.Config(resume=str(tmp_path), device="cpu"))
    assert resumed["curves"]["joint"][-1]["train_mse"] == uninterrupted["curves"]["joint"][-1]["train_mse"]
    assert resumed["models"] == uninterrupted["models"]
    assert not (tmp_path / "joint" / "train_state.pt").exists()


def test_sae_matched_has_the_joint_models_parameter_budget(tiny_run):
    _, report = tiny_run
    models = report["models"]
    assert abs(models["sae_matched"]["params"] / models["joint"]["params"] - 1) < 0.02
    assert models["sae_matched"]["params"] > 1.2 * models["sae"]["params"]
    # at the default config: the joint model with F 4608 and an SAE widened to its budget
    joint = de.DualEncoder(de.TopKSAE(576, 4608, 64), de.NFM(4608, 576, 64, 32))
    n_joint = sum(p.numel() for p in joint.parameters())
    wide = de.TopKSAE(576, rp.matched_features(576, n_joint), 64)
    assert abs(sum(p.numel() for p in wide.parameters()) / n_joint - 1) < 0.001


def test_two_seeds_report_both_runs_and_a_seed_interval(tiny_lm_folder, tiny_run, tmp_path):
    _, one_seed = tiny_run
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, seeds=2))
    assert report["seeds"] == [0, 1] and (tmp_path / "seed1" / "joint" / "cfg.json").exists()
    joint = report["models"]["joint"]
    assert len(joint["per_seed"]["kl"]) == 2 and joint["per_seed"]["kl"][0] == one_seed["models"]["joint"]["kl"]
    assert joint["kl"] == pytest.approx(sum(joint["per_seed"]["kl"]) / 2)
    lo, hi = joint["seed_ci"]["kl"]
    assert lo < joint["kl"] < hi and len(joint["ci"]["kl"]) == 2
    for claim in report["analysis"]["claims"]:
        for reading in claim["readings"].values():
            if "undefined" not in reading:  # a ratio over a denominator that may be 0 has no value to spread
                assert "seed_ci" in reading and len(reading["per_seed"]) == 2
    models, _ = de.load_run(tmp_path, rp.Config)
    assert set(models) == {*rp.Config.STAGES, *(f"seed1/{name}" for name in rp.Config.STAGES)}


def write_saelens(folder, d_in=32, d_sae=48, k=6, seed=0, **cfg):
    """A random TopK SAE in SAELens' v6 layout, as someone else's training would leave it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": 0.1 * torch.randn(d_sae, generator=g),
               "W_dec": torch.randn(d_sae, d_in, generator=g), "b_dec": torch.randn(d_in, generator=g)},
              folder / "sae_weights.safetensors")
    meta = {"model_name": "m", "hook_name": "blocks.2.hook_resid_post", "context_size": 32, "prepend_bos": False,
            "exclude_special_tokens": False, "sae_lens_version": "6.0.0"}
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32", "device": "cpu", "architecture": "topk",
        "apply_b_dec_to_input": False, "normalize_activations": "none", "metadata": meta, **cfg}))
    return folder


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_imported_sae_computes_what_saelens_computes_on_raw_activations(apply_b_dec, tmp_path):
    from safetensors.torch import load_file

    folder = write_saelens(tmp_path / "sae", apply_b_dec_to_input=apply_b_dec)
    w = load_file(folder / "sae_weights.safetensors")
    mean, std = torch.randn(32), torch.rand(32) + 0.5
    model = rp.import_sae(rp.read_saelens(folder), mean, std)
    h = 3 * torch.randn(40, 32) + 1
    pre = (h - w["b_dec"] if apply_b_dec else h) @ w["W_enc"] + w["b_enc"]
    vals, idx = F.relu(pre).topk(6, dim=-1)
    expected = de.to_dense(vals, idx, 48) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(model.reconstruct(h), expected, rtol=1e-5, atol=1e-4)
    got_vals, got_idx = model.sae.encode(model.normalize(h))
    torch.testing.assert_close(de.to_dense(got_vals, got_idx, 48), de.to_dense(vals, idx, 48), rtol=1e-5, atol=1e-4)


def test_a_runs_exported_sae_comes_back_through_sae(tiny_lm_folder, tiny_run, tmp_path):
    out, first = tiny_run
    original = de.load_run(out, rp.Config)[0]["sae"]
    imported = rp.import_sae(rp.read_saelens(out / "sae"), original.mean_D, original.std_D)
    x = 2 * torch.randn(64, 32)
    (v1, i1), (v2, i2) = original.sae.encode(x), imported.sae.encode(x)
    torch.testing.assert_close(de.to_dense(v2, i2, 64), de.to_dense(v1, i1, 64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imported(x), original(x), rtol=1e-5, atol=1e-5)

    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "byo", sae=str(out / "sae")))
    assert set(report["models"]) == {"sae", "sequential"}
    assert report["models"]["sae"]["fvu"] == pytest.approx(first["models"]["sae"]["fvu"], rel=1e-5)
    assert report["models"]["sae"]["kl"] == pytest.approx(first["models"]["sae"]["kl"], rel=1e-4)
    assert report["models"]["sequential"]["fvu"] < report["models"]["sae"]["fvu"]
    assert {c["claim"] for c in report["analysis"]["claims"]} == {
        "sequential vs SAE, reconstruction error reduction", "sequential vs SAE, KL reduction"}
    again = rp.run(rp.Config(eval_only=str(tmp_path / "byo"), device="cpu"))  # the run folder is complete
    assert again["models"]["sequential"]["fvu"] == pytest.approx(report["models"]["sequential"]["fvu"], rel=1e-6)


def break_sae(folder, case):
    """One way an SAE folder can be unusable."""
    if case == "missing file":
        (folder / "sae_weights.safetensors").unlink()
    elif case == "truncated safetensors":
        data = (folder / "sae_weights.safetensors").read_bytes()
        (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    else:
        cfg = json.loads((folder / "cfg.json").read_text())
        change = {"wrong hook": {"metadata": {**cfg["metadata"], "hook_name": "blocks.2.hook_resid_pre"}},
                  "hook outside the model": {"metadata": {**cfg["metadata"], "hook_name": "blocks.9.hook_resid_post"}},
                  "unsupported architecture": {"architecture": "jumprelu"},
                  "normalised activations": {"normalize_activations": "layer_norm"}}[case]
        (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))


@pytest.mark.parametrize("case, msg", [
    ("missing file", "cannot read the SAE"), ("truncated safetensors", "cannot read the SAE"),
    ("wrong hook", "not a block output"), ("hook outside the model", "outside the model's blocks"),
    ("unsupported architecture", "'jumprelu' is not supported"), ("normalised activations", "'layer_norm'"),
    ("wrong d_in", "d_in 16"), ("other layer", "--layer 1, but the SAE reads blocks.2")])
def test_a_bad_sae_folder_fails_with_one_line_before_any_slow_work(case, msg, tiny_lm_folder, tmp_path, monkeypatch,
                                                                    capsys):
    folder = write_saelens(tmp_path / "sae", d_in=16 if case == "wrong d_in" else 32)
    if case not in ("wrong d_in", "other layer"):
        break_sae(folder, case)
    monkeypatch.setattr(de, "read_text", lambda path: pytest.fail("the corpus was read"))
    args = ["--model", tiny_lm_folder, "--sae", str(folder), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        rp.main(args + (["--layer", "1"] if case == "other layer" else []))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and msg in err, err


def test_sae_settings_that_the_sae_fixes_are_refused():
    with pytest.raises(de.DualencError, match="--k do not apply"):
        rp.parse_args(["--sae", "some/sae", "--k", "16"])


def tiny_joint_and_secondary(x, **kw):
    torch.manual_seed(0)
    joint = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=K))
    de.train_joint(joint, x, x, small_cfg())
    secondary, curve, h_eval = rp.train_secondary(joint, x, x, small_cfg(**kw))
    return joint.eval(), secondary.eval(), curve, h_eval


def test_secondary_sae_learns_the_interaction_hidden_layer():
    x = synthetic_acts()
    joint, secondary, curve, h_eval = tiny_joint_and_secondary(x)
    assert secondary.sae.W_dec.shape == (25 * M, M) and secondary.sae.k == round(M * 250 / 300)
    assert curve[-1]["train_mse"] < curve[0]["train_mse"] and curve[-1]["fvu"] < curve[0]["fvu"]
    torch.testing.assert_close(secondary.normalize(rp.interaction_hidden(joint, x)), h_eval)
    # the pipeline with the secondary SAE in place reconstructs x, a little worse than the joint model
    pipeline = rp.IntegrationPipeline(joint, secondary).eval()
    assert de.evaluate(joint, x)["fvu"] <= de.evaluate(pipeline, x)["fvu"] < 1
    _, paper, _, _ = tiny_joint_and_secondary(x, paper_density=True)  # the paper's code: 2 % active
    assert paper.sae.W_dec.shape == (25 * M, M) and paper.sae.k == round(0.02 * 25 * M)


def test_an_integration_features_pairs_and_constant_give_back_its_pre_activation():
    x = synthetic_acts()
    joint, secondary, _, _ = tiny_joint_and_secondary(x)
    z_BM = secondary.normalize(rp.interaction_hidden(joint, x[:64]))
    for g in (0, 7):
        const, idx_BR, pairs_BRR = rp.pair_reading(joint, secondary, x[:64], g)
        direct_B = z_BM @ secondary.sae.W_enc[:, g] + secondary.sae.b_enc[g]
        torch.testing.assert_close(const + pairs_BRR.sum((1, 2)), direct_B, rtol=1e-5, atol=1e-5)
        assert idx_BR.shape == (64, K) and (pairs_BRR.tril() == 0).all()  # each pair once, i < j


def test_scaling_by_one_or_a_silent_feature_by_zero_changes_nothing():
    x = synthetic_acts(n=256)
    joint, secondary, _, _ = tiny_joint_and_secondary(x)
    pipeline = rp.IntegrationPipeline(joint, secondary).eval()
    with torch.no_grad():
        base = pipeline(x)
        active = pipeline.secondary_codes(x)
        busy, silent = int(active.count_nonzero(0).argmax()), int((active.count_nonzero(0) == 0).nonzero()[0])
        pipeline.scale = ("secondary", torch.tensor([busy]), 1.0)
        assert torch.equal(pipeline(x), base)
        pipeline.scale = ("secondary", torch.tensor([silent]), 0.0)
        assert torch.equal(pipeline(x), base)
        pipeline.scale = ("secondary", torch.tensor([busy]), 0.0)
        assert not torch.allclose(pipeline(x), base)
        # control (b) on the selected feature's pathway: the codes pair() reads, nothing else
        vals, idx = joint.sae.encode(x)
        feature = int(idx[0, 0])
        pipeline.scale = ("pair", torch.tensor([feature]), 1.0)
        assert torch.equal(pipeline(x), base)
        pipeline.scale = ("pair", torch.tensor([feature]), 0.0)
        scaled = pipeline(x)
        touched = (idx == feature).any(-1)
        assert not torch.allclose(scaled[touched], base[touched]) and torch.equal(scaled[~touched], base[~touched])
        # the same, written out: x_s and linear(f) as they were, pair(f) reads its codes from the scaled f
        pair_input = joint.nfm.read(torch.where(idx == feature, 0.0, vals), idx)
        expected = joint.sae.decode(vals, idx) + joint.nfm.linear(*joint.nfm.read(vals, idx)) + \
            joint.nfm.mlp[1:](pipeline.through_secondary(joint.nfm.hidden(*pair_input)))
        torch.testing.assert_close(scaled, expected)
    # and through the LM: x1 leaves the next-token log-probabilities where they were
    lm, ids = tiny_llama(), torch.randint(0, 97, (3, 10))
    joint_lm, secondary_lm = de.DualEncoder(de.TopKSAE(32, FEATS, K), de.NFM(FEATS, 32, M)).eval(), None
    secondary_lm = de.DualEncoder(de.TopKSAE(M, 25 * M, 8), None).eval()
    pipe = rp.IntegrationPipeline(joint_lm, secondary_lm).eval()
    prompts, words = [(i, 0) for i in ids], {c: torch.tensor([1, 2, 3]) for c in "abcd"}

    def keep_fn(h):
        return torch.ones(h.shape[:-1], dtype=torch.bool)

    base = rp.word_logprobs(lm, 2, prompts, words, pipe, keep_fn)
    changes, inter = rp.intervention_effect(lm, 2, prompts, words, pipe, keep_fn, ("secondary", torch.tensor([0])), base)
    pipe.scale = ("secondary", torch.tensor([0]), 1.0)
    torch.testing.assert_close(rp.word_logprobs(lm, 2, prompts, words, pipe, keep_fn), base, rtol=0, atol=1e-5)
    assert set(changes) == set(rp.SCALES) and inter[0.0].shape == (3,)


def planted_design(effect, seed=0, per_cell=16, n_features=30):
    """Per-prompt activations of a 2 x 2 design; feature 3 gets an interaction of size `effect`."""
    g = torch.Generator().manual_seed(seed)
    cell = torch.arange(4).repeat_interleave(per_cell)
    A = torch.rand(4 * per_cell, n_features, generator=g)
    A[:, 3] += effect * torch.tensor([1.0, -1.0, -1.0, 1.0])[cell] / 4
    return A, cell


def test_a_planted_interaction_is_found_and_its_permutation_p_is_small():
    A, cell = planted_design(effect=1.0)
    value, t = rp.contrasts(A, cell)["interaction"]
    assert int(t.abs().argmax()) == 3 and value[3].item() == pytest.approx(1.0, abs=0.3)
    assert rp.permutation_p(A[:, [3]], cell, "interaction", 999, torch.Generator().manual_seed(0)).item() < 0.01
    null, cell = planted_design(effect=0.0)
    assert rp.contrasts(null, cell)["interaction"][1][3].abs() < 3
    assert rp.permutation_p(null[:, [3]], cell, "interaction", 999, torch.Generator().manual_seed(0)).item() > 0.05
    # main effects: a feature that only rises with the first factor has no interaction
    A[:, 5] += 2.0 * (cell < 2)
    c = rp.contrasts(A, cell)
    assert int(c["main_a"][1].abs().argmax()) == 5 and c["interaction"][1][5].abs() < 3


@pytest.mark.parametrize("content, msg", [
    ("{not json", "stimuli"), ('{"factors": {"a": ["x", "y"]}}', "not a 2 x 2 design"),
    ('{"factors": {"a": ["x", "y"], "b": ["u", "v"]}, "prompts": {}, "words": {}}', "not a 2 x 2 design"),
    (json.dumps({"factors": {"a": ["x", "y"], "b": ["u", "v"]},
                 "prompts": {c: ["p"] * 3 for c in ("x u", "x v", "y u", "y v")},
                 "words": {c: ["w"] for c in ("x u", "x v", "y u", "y v")}}), "at least 4 prompts")])
def test_a_malformed_stimulus_file_fails_with_one_line(content, msg, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(de.DualencError, match=msg) as err:
        rp.read_stimuli(path)
    assert "\n" not in str(err.value)


def test_the_shipped_stimuli_are_a_full_design_of_single_token_words():
    spec = rp.read_stimuli(None)
    _, tokenizer = de.load_lm(de.SMOLLM2, "cpu")
    design = rp.load_stimuli(spec, tokenizer)
    assert [sum(1 for _, c in design["prompt_ids"] if c == i) for i in range(4)] == [16, 16, 16, 16]
    assert all(len(w) == 8 for w in design["word_ids"].values())
    bad = {**spec, "words": {**spec["words"], spec["cells"][0]: ["extraordinarily-long-word"]}}
    with pytest.raises(de.DualencError, match="single tokens"):
        rp.load_stimuli(bad, tokenizer)


def test_stage34_on_a_tiny_run_writes_its_table_figure_and_secondary_sae(tiny_run, capsys):
    out, first = tiny_run
    report = rp.run(rp.Config(eval_only=str(out), device="cpu", stage34=True))
    saved = json.loads((out / "results.json").read_text())
    assert saved["stage34"] == json.loads(json.dumps(report["stage34"]))  # added to the run's results.json
    assert saved["models"] == json.loads(json.dumps(first["models"]))  # whose evaluation stands
    st = report["stage34"]
    assert st["x1_max_change"] < 1e-5 and set(st["selected"]) == set(rp.CONTRASTS)
    assert list(st["intervention"]) == ["0", "2", "4"]
    for row in st["intervention"].values():
        assert set(row["controls"]) == {"random_matched", "primary_read", "shuffled_selection", "primary_read_whole_code"}
        assert row["controls"]["primary_read_whole_code"]["reference_only"] and row["verdict"] in ("holds", "no", "unclear")
        assert len(row["selected"]["word_list_changes"]) == 4 and len(row["controls"]["primary_read"]["ci"]) == 2
    assert st["selected"]["interaction"]["feature"] not in st["controls"]["shuffled_selection"]
    assert st["verdicts"]["overall"] in ("holds", "no", "unclear")
    assert (out / "stage34.png").read_bytes()[:4] == b"\x89PNG" and (out / "stage34.txt").exists()
    cfg = json.loads((out / "secondary" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post.nfm.hook_interaction_pre_relu"
    assert "stage 4" in capsys.readouterr().out


def test_the_referee_trains_the_methods_models_exactly_as_the_method_does(tiny_method_run, tiny_run):
    # the same windows, split, batches and steps; the referee's activations come through its store
    # (extracted in corpus order, moments in float64), so the numbers agree to float rounding
    (_, method), (_, referee) = tiny_method_run, tiny_run
    for name in de.Config.STAGES:
        for ours, theirs in zip(referee["curves"][name], method["curves"][name], strict=True):
            assert ours == pytest.approx(theirs, rel=1e-4)
        for metric in ("params", "mse", "fvu", "kl", "ce", "ce_recovered"):
            assert referee["models"][name][metric] == pytest.approx(method["models"][name][metric], rel=1e-4)


def test_the_referees_flags_extend_the_methods():
    cfg = rp.parse_args(["--seeds", "3", "--k", "8", "--stage34"])
    assert (cfg.seeds, cfg.k, cfg.stage34, cfg.n_boot) == (3, 8, True, 1000) and isinstance(cfg, de.Config)
    assert rp.parse_args(["--eval-only", "runs/x", "--stage34"]).stage34
    with pytest.raises(de.DualencError, match="only --device, --stage34, --stimuli"):
        rp.parse_args(["--eval-only", "runs/x", "--seeds", "2"])
    with pytest.raises(de.DualencError, match="only --device may be given"):
        de.parse_args(["--eval-only", "runs/x", "--k", "8"])
    with pytest.raises(de.DualencError, match="unrecognized arguments: --stage34"):
        de.parse_args(["--stage34"])  # the method has no stages 3-4
    with pytest.raises(de.DualencError, match="--seeds must be positive"):
        rp.Config(seeds=0)


def test_checkpoints_are_log_spaced_from_the_default_length_to_the_end():
    cfg = rp.Config(checkpoints=5, batch_size=1024, epochs=10, eval_every=100)
    assert rp.checkpoint_steps(cfg, n_train=1_000_000) == [200, 500, 1400, 3700, 9760]  # 0.2 M to 10 M presentations, x 2.7
    assert rp.checkpoint_steps(rp.Config(), n_train=100_000) == []
    long_run = rp.Config(checkpoints=5, batch_size=1024, epochs=10, eval_every=200)  # the end off the cadence
    assert rp.checkpoint_steps(long_run, n_train=1_071_193) == [200, 600, 1400, 3800, 10460]


def test_a_run_of_the_sae_alone_reports_it_without_claims_on_models_it_lacks(tiny_lm_folder, tmp_path):
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, models="sae"))
    assert list(report["models"]) == ["sae"] and report["status"] == "complete"
    assert "seeds: 0" in rp.format_report(report) and "design figure" not in rp.format_report(report)


def test_a_run_with_checkpoints_judges_every_claim_along_the_training_length(tiny_lm_folder, tmp_path):
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, checkpoints=3, models="sae,joint,sae_matched"))
    points = report["along_training"]
    assert [p["step"] for p in points] == rp.checkpoint_steps(rp.Config(**report["config"]), report["data"]["train_tokens"])
    assert len(points) == 3 and points[-1]["step"] == report["data"]["steps_per_model"]
    assert set(report["models"]) == {"sae", "sae_matched", "joint", "joint_sae_path", "joint_linear_only",
                                     "joint_interaction_only"}  # sequential and joint_no_linear not trained
    for p in points:
        curve = {name: next(h for h in report["curves"][name] if h["step"] == p["step"]) for name in ("sae", "joint")}
        for name in curve:  # the model as it was at that step
            assert p["models"][name]["fvu"] == pytest.approx(curve[name]["fvu"], rel=1e-4)
            lo, hi = p["models"][name]["ci"]["kl"]
            assert lo <= p["models"][name]["kl"] <= hi
        assert {c["claim"] for c in p["claims"]} == {c["claim"] for c in report["analysis"]["claims"]}
    assert points[-1]["models"]["joint"]["kl"] == report["models"]["joint"]["kl"]
    assert (tmp_path / "along_training.png").exists() and (tmp_path / "joint" / f"step{points[0]['step']}" / "cfg.json").exists()
    assert "along the training length" in rp.format_report(report)


def test_a_sequential_checkpoint_is_an_nfm_of_that_length_on_the_sae_of_that_step(tiny_lm_folder, tmp_path):
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, checkpoints=3, models="sequential"))
    first = report["along_training"][0]["step"]
    early, sae = (de.load_model(tmp_path / name / f"step{first}") for name in ("sequential", "sae"))
    assert torch.equal(early.sae.W_dec, sae.sae.W_dec)
    assert not torch.equal(early.sae.W_dec, de.load_model(tmp_path / "sae").sae.W_dec)
    assert not torch.equal(early.nfm.W_lin, de.load_model(tmp_path / "sequential").nfm.W_lin)
    point = report["along_training"][0]["models"]
    assert point["sequential"]["fvu"] < point["sae"]["fvu"]  # an NFM on that SAE's residual, not another SAE's


def test_runs_of_one_model_each_combine_into_the_run_that_trains_them_all(tiny_lm_folder, tmp_path):
    whole = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "whole", checkpoints=3, models="sae,joint"))
    pieces = [tmp_path / name for name in ("joint", "sae")]
    for piece in pieces:  # one store: the pieces' data are the whole run's
        rp.run(tiny_run_cfg(tiny_lm_folder, piece, checkpoints=3, models=piece.name, store=f"{tmp_path}/store"))
    combined = rp.run(rp.Config(combine=",".join(map(str, pieces)), out=str(tmp_path / "combined")))
    assert list(combined["models"]) == list(whole["models"]) == ["sae", "joint", "joint_sae_path",
                                                                  "joint_linear_only", "joint_interaction_only"]
    def without_eps(m):  # epsilon-random draws depend on the models evaluated before
        return {k: without_eps(v) if k == "ci" else v for k, v in m.items() if "eps" not in k and "patho" not in k}
    for name, m in whole["models"].items():
        assert without_eps(combined["models"][name]) == without_eps(m)
    for c_point, w_point in zip(combined["along_training"], whole["along_training"], strict=True):
        assert c_point["claims"] == w_point["claims"] and c_point["models"] == w_point["models"]
    assert combined["analysis"]["claims"] == whole["analysis"]["claims"]
    assert [p["models"] for p in combined["pieces"]] == [["joint"], ["sae"]]
    assert (tmp_path / "combined" / "along_training.png").exists()


def test_runs_that_differ_in_more_than_their_models_do_not_combine(tiny_lm_folder, tmp_path):
    for name, kw in (("a", {}), ("b", {"lr": 3e-3}), ("c", {})):
        rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / name, models="sae", store=f"{tmp_path}/store", **kw))
    with pytest.raises(de.DualencError, match="run with lr 0.003"):
        rp.run(rp.Config(combine=f"{tmp_path}/a,{tmp_path}/b", out=str(tmp_path / "ab")))
    with pytest.raises(de.DualencError, match="sae is in"):
        rp.run(rp.Config(combine=f"{tmp_path}/a,{tmp_path}/c", out=str(tmp_path / "ac")))
    with pytest.raises(de.DualencError, match="not a replicate run folder"):
        rp.run(rp.Config(combine=f"{tmp_path}/a,{tmp_path}/missing", out=str(tmp_path / "am")))
    with pytest.raises(de.DualencError, match="only --out may be given with it"):
        rp.parse_args(["--combine", f"{tmp_path}/a,{tmp_path}/c", "--lr", "0.1"])


# ----------------------------------------------------------------------------- the activation store

def store_data(model, root, monkeypatch=None, fail_at=None, **kw):
    """rp.load_data on a tiny run whose store lies under `root`; with fail_at=(call, exception), the
    extraction's call-th batch raises that exception instead."""
    if fail_at is not None:
        calls, extract = [], de.extract_activations

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at[0]:
                raise fail_at[1]
            return extract(*args, **kwargs)
        monkeypatch.setattr(de, "extract_activations", failing)
    cfg = tiny_run_cfg(model, root / "run", store=str(root), **kw)
    _, _, data = rp.load_data(cfg, 2, torch.device("cpu"))
    if fail_at is not None:
        monkeypatch.setattr(de, "extract_activations", extract)
    return data


def store_bytes(root):
    (folder,) = root.iterdir() if root.exists() else [root]
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_the_store_gives_the_methods_training_tokens_and_is_read_not_extracted_again(tiny_lm_folder, tmp_path, monkeypatch):
    stored = store_data(tiny_lm_folder, tmp_path / "store")
    cfg = tiny_run_cfg(tiny_lm_folder, tmp_path / "run")
    _, _, in_ram = de.load_data(cfg, 2, torch.device("cpu"))
    for name in ("mean", "std", "splice_acts"):
        torch.testing.assert_close(stored[name], in_ram[name], rtol=1e-5, atol=1e-5)
    for name in ("x_train", "x_eval"):  # read from disk, batch by batch
        assert len(stored[name]) == len(in_ram[name]) and stored[name].shape == in_ram[name].shape
        every = torch.arange(len(in_ram[name]))
        torch.testing.assert_close(stored[name][every], in_ram[name], rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.cat(list(stored[name].split(1000))), stored[name][every])
    monkeypatch.setattr(de, "extract_activations", lambda *a, **k: pytest.fail("extracted again"))
    again = store_data(tiny_lm_folder, tmp_path / "store")
    assert torch.equal(again["x_eval"][every], stored["x_eval"][every])


def test_an_interrupted_extraction_resumes_to_the_same_bytes(tiny_lm_folder, tmp_path, monkeypatch):
    store_data(tiny_lm_folder, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        store_data(tiny_lm_folder, tmp_path / "cut", monkeypatch, fail_at=(3, KeyboardInterrupt()))
    with open(next((tmp_path / "cut").iterdir()) / "acts.bin", "ab") as f:
        f.write(b"half a batch written when the process was killed")
    store_data(tiny_lm_folder, tmp_path / "cut")
    assert store_bytes(tmp_path / "cut") == store_bytes(tmp_path / "whole")


def test_a_full_disk_stops_with_one_line_and_leaves_an_unfinished_store(tiny_lm_folder, tmp_path, monkeypatch):
    full = OSError(28, "No space left on device")
    with pytest.raises(de.DualencError, match="No space left on device.*resumes") as e:
        store_data(tiny_lm_folder, tmp_path / "store", monkeypatch, fail_at=(2, full))
    assert "\n" not in str(e.value)
    meta = json.loads((next((tmp_path / "store").iterdir()) / "meta.json").read_text())
    assert meta["windows_done"] < meta["shape"][0]  # not a store that looks complete
    store_data(tiny_lm_folder, tmp_path / "store")  # space freed: it finishes
    store_data(tiny_lm_folder, tmp_path / "whole")
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "whole")


def test_a_store_of_the_wrong_size_or_of_another_key_is_refused(tiny_lm_folder, tmp_path):
    store_data(tiny_lm_folder, tmp_path / "store")
    folder = next((tmp_path / "store").iterdir())
    acts = (folder / "acts.bin").read_bytes()
    for wrong in (acts[:-1000], acts + acts[:1000]):  # a finished store has exactly its size
        (folder / "acts.bin").write_bytes(wrong)
        with pytest.raises(de.DualencError, match=f"has {len(wrong):,} bytes in acts.bin where {len(acts):,} are"):
            store_data(tiny_lm_folder, tmp_path / "store")
    (folder / "acts.bin").write_bytes(acts)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "key": {**meta["key"], "layer": 1}}))
    with pytest.raises(de.DualencError, match="another key"):
        store_data(tiny_lm_folder, tmp_path / "store")


def test_the_store_key_is_the_models_weights_not_how_they_were_loaded():
    lm, windows_NT, cfg = tiny_llama(), torch.arange(64).view(2, 32), rp.Config()
    key = rp.store_key(cfg, lm, 2, windows_NT)
    lm.config.quantization_config = {"gguf_file": "model.Q4_1.gguf"}  # loaded from a GGUF file
    lm.config._name_or_path = "/somewhere/else"
    assert rp.store_key(cfg, lm, 2, windows_NT) == key
    with torch.no_grad():
        lm.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert rp.store_key(cfg, lm, 2, windows_NT)["weights"] != key["weights"]


def test_a_model_folder_overwritten_by_other_weights_gets_a_store_of_its_own(tiny_lm_folder, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_lm_folder, folder)
    first = store_data(str(folder), tmp_path / "store")
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        lm.model.layers[0].mlp.down_proj.weight.mul_(2)  # the same architecture, another checkpoint
    lm.save_pretrained(folder)
    second = store_data(str(folder), tmp_path / "store")
    every = torch.arange(len(first["x_eval"]))
    assert len(list((tmp_path / "store").iterdir())) == 2 and not torch.equal(first["x_eval"][every],
                                                                              second["x_eval"][every])


def test_two_extractions_of_one_key_started_together_write_the_store_once(tiny_lm_folder, tmp_path, monkeypatch):
    store_data(tiny_lm_folder, tmp_path / "single")
    second_arrived, extract, write = threading.Event(), de.extract_activations, rp.ActivationStore.extract
    callers = []

    def arriving(store, *args):  # the second extraction reaches the store while the first is writing it
        callers.append(1)
        if len(callers) == 2:
            second_arrived.set()
        return write(store, *args)

    def waiting(*args, **kwargs):  # the first extraction's batches wait until the second has arrived
        assert second_arrived.wait(timeout=60)
        return extract(*args, **kwargs)
    monkeypatch.setattr(rp.ActivationStore, "extract", arriving)
    monkeypatch.setattr(de, "extract_activations", waiting)
    errors = []

    def extraction():
        try:
            store_data(tiny_lm_folder, tmp_path / "together")
        except Exception as e:  # noqa: BLE001 (reported by the assert below)
            errors.append(e)
    threads = [threading.Thread(target=extraction) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(callers) == 2
    assert store_bytes(tmp_path / "together") == store_bytes(tmp_path / "single")


def test_a_float16_store_holds_the_activations_to_float16_rounding(tiny_lm_folder, tmp_path):
    full, half = (store_data(tiny_lm_folder, tmp_path / dtype, store_dtype=dtype) for dtype in ("float32", "float16"))
    assert 2 * len(store_bytes(tmp_path / "float16")["acts.bin"]) == len(store_bytes(tmp_path / "float32")["acts.bin"])
    torch.testing.assert_close(half["splice_acts"], full["splice_acts"], rtol=1e-3, atol=1e-3)
    with pytest.raises(de.DualencError, match="store-dtype"):
        rp.Config(store_dtype="int8")


# ----------------------------------------------------------------------------- stage 4's statistics, on constructed data

CELL = torch.arange(4).repeat_interleave(16)  # 16 prompts per cell, (a1 b1, a1 b2, a2 b1, a2 b2)
UNBALANCED = torch.arange(4).repeat_interleave(torch.tensor([10, 16, 22, 14]))
CONTRAST_K = {name: torch.tensor(k, dtype=torch.float64) for name, k in rp.CONTRASTS.items()}


@pytest.fixture
def one_thread():
    """Thousands of small tensor operations, which a second thread only slows down."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def planted(g, cell=CELL, main_a=0.0, main_b=0.0, interaction=0.0, n_features=1):
    """[P, F] normal noise plus cell means whose contrasts are exactly main_a, main_b, interaction."""
    means_C = main_a * CONTRAST_K["main_a"] + main_b * CONTRAST_K["main_b"] + interaction * CONTRAST_K["interaction"] / 4
    return means_C[cell][:, None] + torch.randn(len(cell), n_features, generator=g, dtype=torch.float64)


def sae_like(g, n_prompts=64, n_features=200):
    """Sparse, heavy-tailed codes like the secondary SAE's: each feature fires on 3-40 % of prompts,
    with lognormal sizes."""
    density_F = torch.empty(n_features, dtype=torch.float64).uniform_(0.03, 0.4, generator=g)
    fires = torch.rand(n_prompts, n_features, generator=g, dtype=torch.float64) < density_F
    return fires * torch.randn(n_prompts, n_features, generator=g, dtype=torch.float64).exp()


def dealt(g, per_cell=16):
    """Cell labels dealt to the prompts at random: they mean nothing."""
    return torch.arange(4).repeat_interleave(per_cell)[torch.randperm(4 * per_cell, generator=g)]


@pytest.mark.parametrize("cell", [CELL, UNBALANCED], ids=["balanced", "unbalanced"])
def test_each_null_keeps_the_other_effects_and_rejects_at_its_nominal_rate(cell, one_thread):
    """The interaction (Freedman-Lane) beside two strong main effects; each main effect (restricted
    permutation) beside a strong other one: 300 designs each, alpha 0.05, 999 permutations."""
    g = torch.Generator().manual_seed(0)
    n_designs, rejected = 300, {"interaction +": 0, "interaction two-sided": 0, "main_a +": 0, "main_b -": 0}
    for _ in range(n_designs):
        y = planted(g, cell, main_a=1.5, main_b=-1.0)
        rejected["interaction +"] += rp.permutation_p(y, cell, "interaction", 999, g, sign=1).item() < 0.05
        rejected["interaction two-sided"] += rp.permutation_p(y, cell, "interaction", 999, g).item() < 0.05
        y_b, y_a = planted(g, cell, main_b=2.0), planted(g, cell, main_a=2.0)  # each main effect's null
        rejected["main_a +"] += rp.permutation_p(y_b, cell, "main_a", 999, g, sign=1).item() < 0.05
        rejected["main_b -"] += rp.permutation_p(y_a, cell, "main_b", 999, g, sign=-1).item() < 0.05
    rates = {name: count / n_designs for name, count in rejected.items()}
    assert all(0.02 <= r <= 0.08 for r in rates.values()), rates


def test_planted_effects_are_found_in_their_direction_only(one_thread):
    g = torch.Generator().manual_seed(1)
    y = planted(g, interaction=2.0)
    assert rp.permutation_p(y, CELL, "interaction", 999, g, 1).item() < 0.01
    assert rp.permutation_p(y, CELL, "interaction", 999, g, -1).item() > 0.9  # one-sided: not the wrong way
    y = planted(g, main_a=-1.5, main_b=1.0)
    assert rp.permutation_p(y, CELL, "main_a", 999, g, -1).item() < 0.01
    assert rp.permutation_p(y, CELL, "main_b", 999, g, 1).item() < 0.01
    assert rp.permutation_p(y, CELL, "interaction", 999, g).item() > 0.05
    assert rp.permutation_p(torch.zeros(64, 1), CELL, "main_a", 99, g, 1).item() == 1.0  # a silent feature
    huge = planted(g, interaction=40.0)  # no permutation reaches it: p is the +1 correction's floor
    assert rp.permutation_p(huge, CELL, "interaction", 199, g, 1).item() == pytest.approx(1 / 200)


def test_the_nulls_keep_what_they_must(one_thread):
    g = torch.Generator().manual_seed(2)
    y = planted(g, UNBALANCED, main_a=1.0, main_b=2.0, n_features=3)
    fit = rp.additive_fit(y, UNBALANCED)
    assert rp.contrasts(fit, UNBALANCED)["interaction"][0].abs().max() < 1e-12  # additive: no interaction
    X = torch.stack([torch.ones(len(UNBALANCED)), (UNBALANCED // 2).double(), (UNBALANCED % 2).double()], 1)
    assert (X.T.double() @ (y - fit)).abs().max() < 1e-9  # least squares: residuals orthogonal to the design
    shuffled = rp.shuffle_within(y, UNBALANCED % 2, 5, g)  # main_a's null: within each level of b
    for b in range(2):
        keep = UNBALANCED % 2 == b
        assert torch.equal(shuffled[:, keep].sort(1).values, y[keep].sort(0).values.expand(5, -1, -1))


def test_select_then_test_on_meaningless_labels_rejects_at_its_nominal_rate(one_thread):
    """400 random dealings of labels to sparse heavy-tailed codes (64 prompts, 200 features): the whole
    pipeline, selection included, gives p < 0.05 at 5 % and Bonferroni keeps "holds" rare."""
    g = torch.Generator().manual_seed(3)
    p, verdicts = [], []
    for _ in range(400):
        out, _, _ = rp.select_and_test(sae_like(g), dealt(g), 200, g, n_perm=999)
        p.append([out[c]["p"] for c in rp.CONTRASTS])
        verdicts.append([out[c]["verdict"] for c in rp.CONTRASTS])
    rate_C = (torch.tensor(p) < 0.05).double().mean(0)
    holds_C = torch.tensor([[v == "holds" for v in row] for row in verdicts]).double()
    assert all(0.02 <= r <= 0.08 for r in rate_C.tolist()), rate_C
    assert (holds_C.mean(0) <= 0.05 / 3 + 0.015).all()  # Bonferroni's third of alpha, + 2.3 binomial sd
    assert holds_C.max(1).values.mean() <= 0.05  # the family-wise rate Bonferroni promises


@pytest.mark.parametrize("seed", range(4))
def test_labels_without_meaning_give_no_holds(seed, one_thread):
    """Features that follow a hidden property of the prompts, not their labels: nothing holds."""
    g = torch.Generator().manual_seed(100 + seed)
    hidden_P = torch.randn(64, 1, generator=g, dtype=torch.float64)
    A = sae_like(g) * (1 + (hidden_P * torch.randn(1, 200, generator=g, dtype=torch.float64)).exp())
    out, _, _ = rp.select_and_test(A, dealt(g), 500, g, n_perm=1999)
    assert all(r["verdict"] != "holds" for r in out.values()), out


def test_a_planted_interaction_is_selected_on_one_half_and_holds_on_the_other(one_thread):
    g = torch.Generator().manual_seed(4)
    A = torch.cat([planted(g, interaction=-3.0), planted(g, n_features=50)], 1)
    out, sel, test = rp.select_and_test(A, CELL, 500, g, n_perm=1999)
    r = out["interaction"]
    assert (r["feature"], r["sign"], r["verdict"]) == (0, -1, "holds") and r["p_bonferroni"] < 0.01
    assert sorted(torch.cat([sel, test]).tolist()) == list(range(64))
    assert [int((CELL[test] == c).sum()) for c in range(4)] == [8, 8, 8, 8]


def test_a_sign_flip_never_holds_and_a_weak_test_is_unclear(one_thread):
    g = torch.Generator().manual_seed(5)
    half_P = rp.split_halves(CELL, g)
    flip_P = torch.where(half_P, 1.0, -1.0).double()[:, None]
    flipped = torch.cat([planted(g, interaction=4.0) * flip_P, planted(g, n_features=30)], 1)
    r = rp.select_and_test(flipped, CELL, 500, g, 999, half_P=half_P)[0]["interaction"]
    assert (r["feature"], r["sign"], r["verdict"]) == (0, 1, "no") and r["p"] > 0.9
    faded = torch.where(half_P[:, None], planted(g, interaction=4.0), planted(g, interaction=0.3))
    r = rp.select_and_test(torch.cat([faded, planted(g, n_features=30)], 1), CELL, 500, g, 999, half_P=half_P)[0]
    assert r["interaction"]["feature"] == 0 and r["interaction"]["p"] > 0.05
    assert r["interaction"]["verdict"] == "unclear"
    for sign in (1, -1):  # the rule itself, in both directions: (p, p the other way, estimate, interval, sign)
        assert rp.held_out_verdict(0.001, 1.0, sign * 0.5, [sign * 0.1, sign * 0.9][::sign], sign) == "holds"
        assert rp.held_out_verdict(1.0, 0.001, -sign * 0.5, [-sign * 0.9, -sign * 0.1][::sign], sign) == "no"
        assert rp.held_out_verdict(1.0, 0.3, -sign * 0.5, [-sign * 0.9, -sign * 0.1][::sign], sign) == "unclear"
        assert rp.held_out_verdict(0.3, 1.0, sign * 0.5, [sign * 0.1, sign * 0.9][::sign], sign) == "unclear"
        assert rp.held_out_verdict(0.001, 1.0, sign * 0.5, [-0.1, 0.9], sign) == "unclear"


def test_a_shuffled_selection_never_picks_the_selected_feature():
    A, cell = planted_design(effect=1.0)
    j = rp.top_feature(A, cell)[0]
    assert j == 3 and rp.top_feature(A, cell, exclude=[3])[0] != 3


def test_the_paired_difference_is_the_difference_of_the_written_out_resampled_means():
    g = torch.Generator().manual_seed(6)
    sel_P = torch.randn(20, generator=g, dtype=torch.float64)
    ctrl_CP = torch.randn(12, 20, generator=g, dtype=torch.float64)
    w_RP = rp.bootstrap_weights(20, 30, g)
    for sign in (1, -1):
        d_R = rp.paired_difference(sel_P, ctrl_CP, w_RP, sign)
        for r in range(len(w_RP)):
            drawn = torch.arange(20).repeat_interleave(w_RP[r].long())  # the resample written out
            written_out = sign * sel_P[drawn].mean() - ctrl_CP[:, drawn].mean(1).abs().mean()
            assert d_R[r].item() == pytest.approx(written_out.item(), abs=1e-12)


def test_an_intervention_holds_only_beyond_every_deciding_control():
    g = torch.Generator().manual_seed(7)
    sel_P = 1.0 + 0.3 * torch.randn(40, generator=g, dtype=torch.float64)
    quiet = 0.3 * torch.randn(12, 40, generator=g, dtype=torch.float64)
    w_RP = rp.bootstrap_weights(40, 400, g)
    out = rp.beyond_controls(sel_P, {"random": quiet}, w_RP)
    assert out["verdict"] == "holds" and out["controls"]["random"]["rank"] == 0.0
    assert rp.beyond_controls(-sel_P, {"random": quiet}, w_RP)["verdict"] == "holds"
    stronger = {"random": quiet, "primary": 2.0 + quiet[:2]}
    assert rp.beyond_controls(sel_P, stronger, w_RP)["verdict"] == "no"  # a control moves the lists further
    out = rp.beyond_controls(sel_P, stronger, w_RP, reference=("primary",))
    assert out["verdict"] == "holds" and out["controls"]["primary"]["rank"] == 1.0  # shown, does not decide
    assert rp.beyond_controls(sel_P, {"random": quiet, "close": 1.0 + quiet}, w_RP)["verdict"] == "unclear"
    half = torch.cat([quiet[:6], 5.0 + quiet[6:]])
    assert rp.beyond_controls(sel_P, {"mixed": half}, w_RP)["controls"]["mixed"]["rank"] == 0.5
    # a control's direction means nothing: features pushing both ways, or the other way, still count by size
    both_ways = torch.cat([3.0 + quiet[:6], -3.0 + quiet[6:]])
    assert rp.beyond_controls(sel_P, {"random": both_ways}, w_RP)["verdict"] == "no"
    assert rp.beyond_controls(sel_P, {"other_way": -3.0 + quiet[:1]}, w_RP)["verdict"] == "no"
    faint = 0.05 + torch.randn(40, generator=g, dtype=torch.float64)  # its own interval contains 0
    assert rp.beyond_controls(faint, {"random": 0.01 * quiet}, w_RP)["verdict"] != "holds"


def test_a_share_whose_denominator_may_be_zero_is_undefined_and_unclear():
    seed = fake_seed(joint_kl=1.0, noise=0.05)  # the joint model gains nothing over the SAE
    rows = {c["claim"]: c["readings"] for c in rp.claims([seed])}
    share = rows["nonlinear part alone, share of the joint model's KL gain"]["fair"]
    assert share["value"] is None and share["ci"] is None and share["verdict"] == "unclear"
    assert "contains 0" in share["undefined"]
    defined = {c["claim"]: c["readings"] for c in rp.claims([fake_seed()])}
    assert defined["nonlinear part alone, share of the joint model's KL gain"]["fair"]["value"] == pytest.approx(0.2)


@pytest.mark.parametrize("tie", [0, 150], ids=["tie_in_the_tail", "tie_at_the_centre"])
def test_a_tied_resample_cannot_collapse_a_mixture_component(tie):
    """30 % of a resample's weight on one value: every sd stays at the floor or above, and the gain over
    one Gaussian within n (ln(s_w / h) + 1/2) nats (a floor of 1e-6 sd allowed about 14 n)."""
    g = torch.Generator().manual_seed(9)
    n = 200
    x = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.full((n,), 0.7 * n / (n - 1), dtype=torch.float64)
    w[tie] = 0.3 * n
    fit, floor = rp.gmm2(x, torch.stack([torch.ones(n, dtype=torch.float64), w])), rp.gmm_floor(x)
    assert (fit["stds"] >= floor * (1 - 1e-12)).all() and torch.isfinite(fit["loglik"]).all()
    s_w = rp.weighted_moments(x, w)[1].sqrt()
    gain = (fit["loglik"][1] + 0.5 * n * (torch.log(2 * math.pi * s_w ** 2) + 1)).item()
    assert gain <= n * (math.log(s_w / floor) + 0.5) and gain < 0.5 * n


def test_each_program_reads_the_others_run_folders(tiny_method_run, tiny_run, tmp_path):
    import shutil

    method_out, method = tiny_method_run
    shutil.copytree(method_out, tmp_path / "run")
    extended = rp.run(rp.Config(resume=str(tmp_path / "run"), device="cpu"))  # trains the two baselines it lacks
    assert set(extended["models"]) >= {"sae_matched", "joint_no_linear"} and extended["analysis"]["claims"]
    assert extended["curves"]["joint"] == method["curves"]["joint"]
    referee_out, referee = tiny_run
    again = de.run(de.Config(eval_only=str(referee_out), device="cpu"))  # the method's three models of it
    assert list(again["models"]) == list(de.Config.STAGES)
    assert again["models"]["joint"]["fvu"] == pytest.approx(referee["models"]["joint"]["fvu"], rel=1e-5)
