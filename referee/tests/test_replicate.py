"""Tests for replicate.py, the referee, written as examples of its API: baselines, claims and their
verdicts, whole runs, the activation store, the training length and bring-your-own-SAE, and the
report's tables (report.py). Its tiny models, runs and fixtures are conftest.py's. The statistics
are tested in test_stats.py, stages 3-4 in test_stages34.py (on the same tiny run)."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import dualenc as de
from referee import checkpoint, corpus, runner
from referee import replicate as rp
from referee import report as rep
from conftest import D, FEATS, K, M, interrupt_training_at, tiny_run_cfg


def test_param_counts_match_a_hand_count():
    model = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M))
    counts = rp.param_counts(model)
    assert counts == {"sae_encoder": D * FEATS + FEATS, "sae_decoder": FEATS * D + D,
                      "nfm_linear": FEATS * D, "nfm_embed": FEATS * M,
                      "nfm_mlp": (M * M + M) + M * D}  # b_dec is the one output bias
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    assert rp.params_used(model, ()) == counts["sae_encoder"] + counts["sae_decoder"]
    assert rp.params_used(model, de.PATHWAYS) == sum(counts.values())


def fake_seed(R=200, seed=0, joint_kl=0.5, noise=0.01):
    """One seed's samples as analyse_seed returns them, with chosen values and bootstrap noise."""
    g = torch.Generator().manual_seed(seed)

    def sample(v):
        return v + torch.cat([torch.zeros(1), noise * torch.randn(R, generator=g)]).double()

    names = ("sae", "sae_matched", "sequential", "joint", "joint_sae_path",
             "joint_interaction_only", "joint_no_linear")
    models = {n: {"mse": sample(1.0), "kl": sample(1.0)} for n in names}
    models["joint"] = {"mse": sample(0.5), "kl": sample(joint_kl)}
    models["sequential"] = {"mse": sample(1.1), "kl": sample(1.0)}  # worse than the SAE
    models["joint_interaction_only"] = models["joint_no_linear"] = {"mse": sample(1.0),
                                                                    "kl": sample(0.9)}
    norms = {"r_sq_norm_vs_nfm_share": sample(-0.9), "bc_joint_W_dec": sample(0.7),
             "bc_joint_merged": sample(0.4), "bc_sae": sample(0.3),
             "delta_bic_joint_W_dec": sample(50.0), "delta_bic_joint_merged": sample(-5.0),
             "delta_bic_sae": sample(-20.0)}
    return {"models": models, "contrib": {"joint": sample(0.06)}, "norms": norms}


def test_claims_give_a_verdict_per_reading_from_their_intervals():
    rows = {c["claim"]: c["readings"] for c in rp.claims([fake_seed()])}
    assert rows["joint vs SAE, KL reduction"]["fair"]["verdict"] == "holds"
    assert rows["sequential vs SAE, reconstruction error reduction"]["paper_way"]["verdict"] == "no"
    assert (rows["nonlinear part alone, share of the joint model's KL gain"]["fair"]["value"]
            == pytest.approx(0.2))
    assert rows["nonlinear part alone, its own KL reduction"]["fair"]["value"] == pytest.approx(0.1)
    assert (rows["joint decoder sq. norms bimodal: bimodality coef."]["paper_way"]["verdict"]
            == "holds")
    assert rows["joint decoder sq. norms bimodal: bimodality coef."]["fair"]["verdict"] == "no"
    assert not any("parameters" in claim for claim in rows)  # the parameter share: a design figure
    # a KL reduction at the threshold, with noise: the interval straddles it
    rows = {c["claim"]: c["readings"]
            for c in rp.claims([fake_seed(joint_kl=1 - 0.258, noise=0.05)])}
    assert rows["joint vs SAE, KL reduction"]["fair"]["verdict"] == "unclear"
    # two seeds: the seed interval is reported beside the bootstrap one and both decide
    rows = {c["claim"]: c["readings"]
            for c in rp.claims([fake_seed(seed=0), fake_seed(seed=1, joint_kl=0.8)])}
    fair = rows["joint vs SAE, KL reduction"]["fair"]
    assert fair["per_seed"] == pytest.approx([0.5, 0.2]) and fair["verdict"] == "unclear"


@pytest.mark.slow  # the real SmolLM2
def test_quick_run_on_smollm2_writes_complete_results(quick_run):
    tmp_path = quick_run
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "data", "models", "clean_ce", "zero_ce", "timings_s"} <= res.keys()
    assert res["data"]["d_model"] == 576 and res["data"]["layer"] == 15
    assert (res["data"]["train_tokens"] > 10_000
            and res["data"]["excluded_tokens"] >= res["config"]["tokens"] // 128)
    for name in ("sae", "sae_matched", "sequential", "joint", "joint_sae_path"):
        m = res["models"][name]
        assert {"params", "mse", "fvu", "kl", "kl_eps_random", "pathology_ratio", "ce",
                "ce_recovered"} <= m.keys()
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
    assert (list(res["peak_rss_gib"])[:2] == ["load_extract", "train_sae"]
            and peaks == sorted(peaks) and peaks[0] > 0.1)
    for name in rp.Config.STAGES:
        assert {"cfg.json", "sae_weights.safetensors", "zscore.safetensors"} <= {
            p.name for p in (tmp_path / name).iterdir()}
    for figure in ("curves.png", "decoder_norms.png", "models.png"):
        assert (tmp_path / figure).read_bytes()[:4] == b"\x89PNG"


def test_same_seed_gives_identical_results(tiny_lm_folder, tiny_run, tmp_path):
    _, first = tiny_run
    second = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path))
    assert second["models"] == first["models"] and second["curves"] == first["curves"]
    assert second["analysis"]["claims"] == first["analysis"]["claims"]


def test_eval_only_reproduces_a_saved_run(tiny_run, tmp_path, monkeypatch):
    out, first = tiny_run
    monkeypatch.chdir(tmp_path)
    again = rp.run(rp.Config(eval_only=str(out), device="cpu"))
    assert not (tmp_path / rp.STORE).exists()  # no --store: the run's own store, no extraction
    for name, metrics in first["models"].items():
        for metric, value in metrics.items():
            if metric != "ci":
                assert again["models"][name][metric] == pytest.approx(value, rel=1e-6, abs=1e-6)
        assert again["models"][name]["ci"]["kl"] == pytest.approx(metrics["ci"]["kl"], rel=1e-6,
                                                                   abs=1e-6)
    assert (out / "results_eval_only.json").exists()
    models, report = runner.load_run(out, rp.Config)
    assert set(models) == set(rp.Config.STAGES) and report["status"] == "complete"


def test_interrupted_run_resumes_to_the_same_result(tiny_lm_folder, tiny_run, tmp_path,
                                                    monkeypatch):
    _, uninterrupted = tiny_run
    steps = uninterrupted["data"]["steps_per_model"]
    # the joint model's 12th step: checkpoint at 10
    real_step = interrupt_training_at(monkeypatch, 3 * steps + 12)
    with pytest.raises(KeyboardInterrupt):
        rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path))
    partial = json.loads((tmp_path / "results.json").read_text())
    assert (partial["status"] == "incomplete"
            and partial["stages_done"] == ["sae", "sae_matched", "sequential"])
    assert ((tmp_path / "joint" / "train_state.pt").exists()
            and not (tmp_path / "joint" / "cfg.json").exists())
    with pytest.raises(de.DualencError, match="unfinished"):
        rp.run(rp.Config(eval_only=str(tmp_path), device="cpu"))

    monkeypatch.setattr(de, "train_step", real_step)
    resumed = rp.run(rp.Config(resume=str(tmp_path), device="cpu"))
    assert (resumed["curves"]["joint"][-1]["train_mse"]
            == uninterrupted["curves"]["joint"][-1]["train_mse"])
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


@pytest.mark.slow  # takes long on its own
def test_two_seeds_report_both_runs_and_a_seed_interval(tiny_lm_folder, tiny_run, tmp_path):
    _, one_seed = tiny_run
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, seeds=2))
    assert report["seeds"] == [0, 1] and (tmp_path / "seed1" / "joint" / "cfg.json").exists()
    joint = report["models"]["joint"]
    assert (len(joint["per_seed"]["kl"]) == 2
            and joint["per_seed"]["kl"][0] == one_seed["models"]["joint"]["kl"])
    assert joint["kl"] == pytest.approx(sum(joint["per_seed"]["kl"]) / 2)
    lo, hi = joint["seed_ci"]["kl"]
    assert lo < joint["kl"] < hi and len(joint["ci"]["kl"]) == 2
    for claim in report["analysis"]["claims"]:
        for reading in claim["readings"].values():
            # a ratio over a denominator that may be 0 has no value to spread
            if "undefined" not in reading:
                assert "seed_ci" in reading and len(reading["per_seed"]) == 2
    models, _ = runner.load_run(tmp_path, rp.Config)
    assert set(models) == {*rp.Config.STAGES, *(f"seed1/{name}" for name in rp.Config.STAGES)}


def write_saelens(folder, d_in=32, d_sae=48, k=6, seed=0, **cfg):
    """A random TopK SAE in SAELens' v6 layout, as someone else's training would leave it."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"W_enc": torch.randn(d_in, d_sae, generator=g),
               "b_enc": 0.1 * torch.randn(d_sae, generator=g),
               "W_dec": torch.randn(d_sae, d_in, generator=g),
               "b_dec": torch.randn(d_in, generator=g)},
              folder / "sae_weights.safetensors")
    meta = {"model_name": "m", "hook_name": "blocks.2.hook_resid_post", "context_size": 32,
            "prepend_bos": False, "exclude_special_tokens": False, "sae_lens_version": "6.0.0"}
    (folder / "cfg.json").write_text(json.dumps({
        "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32", "device": "cpu",
        "architecture": "topk", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "metadata": meta, **cfg}))
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
    torch.testing.assert_close(de.to_dense(got_vals, got_idx, 48), de.to_dense(vals, idx, 48),
                               rtol=1e-5, atol=1e-4)


def test_a_runs_exported_sae_comes_back_through_sae(tiny_lm_folder, tiny_run, tmp_path):
    out, first = tiny_run
    original = runner.load_run(out, rp.Config)[0]["sae"]
    imported = rp.import_sae(rp.read_saelens(out / "sae"), original.mean_D, original.std_D)
    x = 2 * torch.randn(64, 32)
    (v1, i1), (v2, i2) = original.sae.encode(x), imported.sae.encode(x)
    torch.testing.assert_close(de.to_dense(v2, i2, 64), de.to_dense(v1, i1, 64),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imported(x), original(x), rtol=1e-5, atol=1e-5)

    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "byo", sae=str(out / "sae")))
    assert set(report["models"]) == {"sae", "sequential"}
    assert report["models"]["sae"]["fvu"] == pytest.approx(first["models"]["sae"]["fvu"], rel=1e-5)
    assert report["models"]["sae"]["kl"] == pytest.approx(first["models"]["sae"]["kl"], rel=1e-4)
    assert report["models"]["sequential"]["fvu"] < report["models"]["sae"]["fvu"]
    assert {c["claim"] for c in report["analysis"]["claims"]} == {
        "sequential vs SAE, reconstruction error reduction", "sequential vs SAE, KL reduction"}
    # the run folder is complete
    again = rp.run(rp.Config(eval_only=str(tmp_path / "byo"), device="cpu"))
    assert again["models"]["sequential"]["fvu"] == pytest.approx(
        report["models"]["sequential"]["fvu"], rel=1e-6)


def break_sae(folder, case):
    """One way an SAE folder can be unusable."""
    if case == "missing file":
        (folder / "sae_weights.safetensors").unlink()
    elif case == "truncated safetensors":
        data = (folder / "sae_weights.safetensors").read_bytes()
        (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    else:
        cfg = json.loads((folder / "cfg.json").read_text())
        change = {"wrong hook": {"metadata": {**cfg["metadata"],
                                              "hook_name": "blocks.2.hook_resid_pre"}},
                  "hook outside the model": {"metadata": {**cfg["metadata"],
                                                          "hook_name": "blocks.9.hook_resid_post"}},
                  "unsupported architecture": {"architecture": "jumprelu"},
                  "normalised activations": {"normalize_activations": "layer_norm"}}[case]
        (folder / "cfg.json").write_text(json.dumps({**cfg, **change}))


@pytest.mark.parametrize("case, msg", [
    ("missing file", "cannot read the SAE"), ("truncated safetensors", "cannot read the SAE"),
    ("wrong hook", "not a block output"), ("hook outside the model", "outside the model's blocks"),
    ("unsupported architecture", "'jumprelu' is not supported"),
    ("normalised activations", "'layer_norm'"),
    ("wrong d_in", "d_in 16"), ("other layer", "--layer 1, but the SAE reads blocks.2")])
def test_a_bad_sae_folder_fails_with_one_line_before_any_slow_work(case, msg, tiny_lm_folder,
                                                                    tmp_path, monkeypatch, capsys):
    folder = write_saelens(tmp_path / "sae", d_in=16 if case == "wrong d_in" else 32)
    if case not in ("wrong d_in", "other layer"):
        break_sae(folder, case)
    monkeypatch.setattr(corpus, "read_text", lambda path: pytest.fail("the corpus was read"))
    args = ["--model", tiny_lm_folder, "--sae", str(folder), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_:
        rp.main(args + (["--layer", "1"] if case == "other layer" else []))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and msg in err, err


def test_sae_settings_that_the_sae_fixes_are_refused():
    with pytest.raises(de.DualencError, match="--k do not apply"):
        rp.parse_args(["--sae", "some/sae", "--k", "16"])


def test_the_referee_trains_the_methods_models_exactly_as_the_method_does(tiny_method_run,
                                                                          tiny_run):
    # the same windows, split, batches and steps; the referee's activations come through its store
    # (extracted in corpus order, moments in float64), so the numbers agree to float rounding
    (_, method), (_, referee) = tiny_method_run, tiny_run
    for name in runner.RunConfig.STAGES:
        for ours, theirs in zip(referee["curves"][name], method["curves"][name], strict=True):
            assert ours == pytest.approx(theirs, rel=1e-4)
        for metric in ("params", "mse", "fvu", "kl", "ce", "ce_recovered"):
            assert referee["models"][name][metric] == pytest.approx(method["models"][name][metric],
                                                                    rel=1e-4)


def test_the_referees_flags_extend_the_methods():
    cfg = rp.parse_args(["--seeds", "3", "--k", "8", "--stage34"])
    assert ((cfg.seeds, cfg.k, cfg.stage34, cfg.n_boot) == (3, 8, True, 1000)
            and isinstance(cfg, runner.RunConfig))
    assert rp.parse_args(["--eval-only", "runs/x", "--stage34"]).stage34
    with pytest.raises(de.DualencError,
                       match="only --device, --rank-timeout, --stage34, --stimuli"):
        rp.parse_args(["--eval-only", "runs/x", "--seeds", "2"])
    with pytest.raises(de.DualencError, match="only --device, --rank-timeout may be given"):
        runner.parse_args(["--eval-only", "runs/x", "--k", "8"])
    with pytest.raises(de.DualencError, match="unrecognized arguments: --stage34"):
        runner.parse_args(["--stage34"])  # the method has no stages 3-4
    with pytest.raises(de.DualencError, match="--seeds must be positive"):
        rp.Config(seeds=0)


def test_checkpoints_are_log_spaced_from_the_default_length_to_the_end():
    cfg = rp.Config(checkpoints=5, batch_size=1024, epochs=10, eval_every=100)
    # 0.2 M to 10 M presentations, x 2.7
    assert rp.checkpoint_steps(cfg, n_train=1_000_000) == [200, 500, 1400, 3700, 9760]
    assert rp.checkpoint_steps(rp.Config(), n_train=100_000) == []
    # the end off the cadence
    long_run = rp.Config(checkpoints=5, batch_size=1024, epochs=10, eval_every=200)
    assert rp.checkpoint_steps(long_run, n_train=1_071_193) == [200, 600, 1400, 3800, 10460]


def test_a_run_of_the_sae_alone_reports_it_without_claims_on_models_it_lacks(tiny_lm_folder,
                                                                              tmp_path):
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, models="sae"))
    assert list(report["models"]) == ["sae"] and report["status"] == "complete"
    assert ("seeds: 0" in rep.format_report(report)
            and "design figure" not in rep.format_report(report))


@pytest.mark.slow  # takes long on its own
def test_a_run_with_checkpoints_judges_every_claim_along_the_training_length(tiny_lm_folder,
                                                                              tmp_path):
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, checkpoints=3,
                                 models="sae,joint,sae_matched"))
    points = report["along_training"]
    assert [p["step"] for p in points] == rp.checkpoint_steps(rp.Config(**report["config"]),
                                                              report["data"]["train_tokens"])
    assert len(points) == 3 and points[-1]["step"] == report["data"]["steps_per_model"]
    # sequential and joint_no_linear not trained
    assert set(report["models"]) == {"sae", "sae_matched", "joint", "joint_sae_path",
                                     "joint_linear_only", "joint_interaction_only"}
    for p in points:
        curve = {name: next(h for h in report["curves"][name] if h["step"] == p["step"])
                 for name in ("sae", "joint")}
        for name in curve:  # the model as it was at that step
            assert p["models"][name]["fvu"] == pytest.approx(curve[name]["fvu"], rel=1e-4)
            lo, hi = p["models"][name]["ci"]["kl"]
            assert lo <= p["models"][name]["kl"] <= hi
        assert ({c["claim"] for c in p["claims"]}
                == {c["claim"] for c in report["analysis"]["claims"]})
    assert points[-1]["models"]["joint"]["kl"] == report["models"]["joint"]["kl"]
    assert ((tmp_path / "along_training.png").exists()
            and (tmp_path / "joint" / f"step{points[0]['step']}" / "cfg.json").exists())
    assert "along the training length" in rep.format_report(report)


def test_a_sequential_checkpoint_is_an_nfm_of_that_length_on_the_sae_of_that_step(tiny_lm_folder,
                                                                                   tmp_path):
    report = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path, checkpoints=3, models="sequential"))
    first = report["along_training"][0]["step"]
    early, sae = (checkpoint.load_model(tmp_path / name / f"step{first}")
                  for name in ("sequential", "sae"))
    assert torch.equal(early.sae.W_dec, sae.sae.W_dec)
    finished = {name: checkpoint.load_model(tmp_path / name) for name in ("sae", "sequential")}
    assert not torch.equal(early.sae.W_dec, finished["sae"].sae.W_dec)
    assert not torch.equal(early.nfm.W_lin, finished["sequential"].nfm.W_lin)
    point = report["along_training"][0]["models"]
    # an NFM on that SAE's residual, not another SAE's
    assert point["sequential"]["fvu"] < point["sae"]["fvu"]


@pytest.mark.slow  # takes long on its own
def test_wsd_checkpoints_are_branches_that_leave_the_run_as_it_was(tiny_lm_folder, tmp_path):
    kw = dict(models="sequential", schedule="wsd", store=f"{tmp_path}/store")
    branched = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "branched", checkpoints=3, **kw))
    plain = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "plain", **kw))
    assert branched["curves"] == plain["curves"] and branched["models"] == plain["models"]
    first = branched["along_training"][0]["step"]
    early = checkpoint.load_model(tmp_path / "branched" / "sae" / f"step{first}")
    finished = checkpoint.load_model(tmp_path / "plain" / "sae")
    assert not torch.equal(early.sae.W_dec, finished.sae.W_dec)
    point = branched["along_training"][0]["models"]
    assert point["sequential"]["fvu"] < point["sae"]["fvu"]  # an NFM on that SAE's residual
    noise = branched["path_noise_fvu"]  # the curve's moves in the stable phase's last half
    assert noise.keys() == {"sae", "sequential"} and all(v >= 0 for v in noise.values())
    assert branched["along_training"][-1]["path_noise_fvu"] == noise


def test_path_noise_is_the_largest_move_of_the_curve_in_the_stable_phases_last_half():
    fvu = [0.5, 0.4, 0.30, 0.28, 0.31, 0.29, 0.30, 0.30, 0.1, 0.05]  # steps 100..1000
    curve = [{"step": 100 * (i + 1), "fvu": f} for i, f in enumerate(fvu)]
    assert rp.path_noise(curve, 300, 700) == pytest.approx(0.03)  # 0.28 -> 0.31
    assert rp.path_noise(curve, 650, 700) is None  # one evaluation: no move to measure
    cfg = rp.Config(schedule="wsd", wsd_decay=0.2, warmup_steps=100)
    # the main run decays after step 800: its stable phase 100..800, the last half from 450
    assert rp.stable_path_noise({"sae": curve, "seed1/sae": curve}, cfg, 1000) == {
        "sae": pytest.approx(0.02)}  # 0.31 -> 0.29 at 500 -> 600; the first seed's only
    assert rp.stable_path_noise({"sae": curve}, rp.Config(), 1000) == {}  # the paper's: no phase


def test_gap_readings_carry_each_models_path_noise_to_kl_and_take_the_pairs_larger():
    point = {"path_noise_fvu": {"sae": 0.002, "joint": 0.004},
             "models": {"sae": {"fvu": 0.10, "kl": 0.20}, "joint": {"fvu": 0.08, "kl": 0.10}},
             "claims": [{"claim": "joint vs SAE, reconstruction error reduction",
                         "readings": {"fair": {"value": 0.2, "ci": [0.18, 0.22]}}},
                        {"claim": "joint vs SAE, KL reduction",
                         "readings": {"fair": {"value": 0.5, "ci": [-0.1, 0.9]}}}]}
    gaps = rp.gap_readings(point)
    assert gaps.keys() == {"joint vs sae, fvu", "joint vs sae, kl"}  # no sae_matched here
    fvu, kl = gaps["joint vs sae, fvu"], gaps["joint vs sae, kl"]
    assert fvu["reading"] == "ahead" and fvu["noise"] == pytest.approx(0.04)  # 0.004 / 0.10
    # KL: sae's 0.02 x 0.20 = 0.004, joint's 0.05 x 0.10 = 0.005: 0.005 / 0.20 of sae's KL
    assert kl == {"reading": "within", "within": 0.9, "noise": pytest.approx(0.025)}
    assert rp.gap_readings({**point, "path_noise_fvu": {}}) == {}  # the paper's schedule


@pytest.mark.slow  # takes long on its own
def test_runs_of_one_model_each_combine_into_the_run_that_trains_them_all(tiny_lm_folder, tmp_path):
    whole = rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "whole", checkpoints=3,
                                models="sae,joint"))
    pieces = [tmp_path / name for name in ("joint", "sae")]
    for piece in pieces:  # one store: the pieces' data are the whole run's
        rp.run(tiny_run_cfg(tiny_lm_folder, piece, checkpoints=3, models=piece.name,
                            store=f"{tmp_path}/store"))
    combined = rp.run(rp.Config(combine=",".join(map(str, pieces)), out=str(tmp_path / "combined")))
    assert list(combined["models"]) == list(whole["models"]) == [
        "sae", "joint", "joint_sae_path", "joint_linear_only", "joint_interaction_only"]
    def without_eps(m):  # epsilon-random draws depend on the models evaluated before
        return {k: without_eps(v) if k == "ci" else v for k, v in m.items()
                if "eps" not in k and "patho" not in k}
    for name, m in whole["models"].items():
        assert without_eps(combined["models"][name]) == without_eps(m)
    for c_point, w_point in zip(combined["along_training"], whole["along_training"], strict=True):
        assert c_point["claims"] == w_point["claims"] and c_point["models"] == w_point["models"]
    assert combined["analysis"]["claims"] == whole["analysis"]["claims"]
    assert [p["models"] for p in combined["pieces"]] == [["joint"], ["sae"]]
    assert (tmp_path / "combined" / "along_training.png").exists()
    # each model at its own rate: the pieces combine, and the table shows each model's rate
    rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / "sae_fast", checkpoints=3, models="sae",
                        lr=3e-3, store=f"{tmp_path}/store"))
    rates = rp.run(rp.Config(combine=f"{tmp_path}/joint,{tmp_path}/sae_fast",
                             out=str(tmp_path / "rates")))
    assert rates["lr"] == {"sae": 3e-3, "joint": 1e-3, "joint_sae_path": 1e-3,
                           "joint_linear_only": 1e-3, "joint_interaction_only": 1e-3}
    sae_row = next(r for r in runner.format_models(rates) if r.startswith("sae "))
    assert sae_row.endswith("3.0e-03")


def test_runs_that_differ_in_more_than_their_models_do_not_combine(tiny_lm_folder, tmp_path):
    for name, kw in (("a", {}), ("b", {"warmup_steps": 3}), ("c", {})):
        rp.run(tiny_run_cfg(tiny_lm_folder, tmp_path / name, models="sae",
                            store=f"{tmp_path}/store", **kw))
    with pytest.raises(de.DualencError, match="run with warmup_steps 3"):
        rp.run(rp.Config(combine=f"{tmp_path}/a,{tmp_path}/b", out=str(tmp_path / "ab")))
    with pytest.raises(de.DualencError, match="sae is in"):
        rp.run(rp.Config(combine=f"{tmp_path}/a,{tmp_path}/c", out=str(tmp_path / "ac")))
    with pytest.raises(de.DualencError, match="not a replicate run folder"):
        rp.run(rp.Config(combine=f"{tmp_path}/a,{tmp_path}/missing", out=str(tmp_path / "am")))
    with pytest.raises(de.DualencError, match="only --out may be given with it"):
        rp.parse_args(["--combine", f"{tmp_path}/a,{tmp_path}/c", "--lr", "0.1"])


@pytest.mark.slow  # takes long on its own
def test_compare_puts_two_runs_side_by_side_paired_over_windows(tiny_lm_folder, tmp_path):
    runs = {name: tmp_path / name for name in ("fp32", "bf16", "bf16_lm")}
    for (name, run), kw in zip(runs.items(), ({}, {"precision": "bf16"},
                                              {"extract_precision": "bf16"})):
        rp.run(tiny_run_cfg(tiny_lm_folder, run, models="sae,joint", store=f"{tmp_path}/store",
                            **kw))
    same = rp.run(rp.Config(compare=f"{runs['fp32']},{runs['fp32']}", out=str(tmp_path / "aa")))
    assert same["differ"] == {} and same["verdicts_changed"] == 0
    assert all(f["b_minus_a"]["value"] == 0 and f["b_minus_a"]["ci"] == [0, 0]
               for figures in same["models"].values() for f in figures.values())
    result = rp.run(rp.Config(compare=f"{runs['fp32']},{runs['bf16']}", out=str(tmp_path / "ab")))
    assert result["differ"] == {"precision": ["fp32", "bf16"]}
    for name, precision in (("fp32", "fp32"), ("bf16", "bf16")):  # each run records its own
        assert json.loads((runs[name] / "results.json").read_text())["config"]["precision"] == (
            precision)
    a, b = (json.loads((runs[n] / "results.json").read_text())["models"] for n in ("fp32", "bf16"))
    fvu = result["models"]["joint"]["fvu"]
    assert (fvu["a"]["value"], fvu["b"]["value"]) == pytest.approx((a["joint"]["fvu"],
                                                                     b["joint"]["fvu"]))
    assert fvu["b_minus_a"]["value"] == pytest.approx(b["joint"]["fvu"] - a["joint"]["fvu"])
    lo, hi = fvu["b_minus_a"]["ci"]
    assert lo < fvu["b_minus_a"]["value"] < hi
    assert "precision fp32 -> bf16" in (tmp_path / "ab" / "compare.txt").read_text()
    with pytest.raises(de.DualencError, match="other tokens"):  # another extraction's activations
        rp.run(rp.Config(compare=f"{runs['fp32']},{runs['bf16_lm']}", out=str(tmp_path / "ac")))
    with pytest.raises(de.DualencError, match="two run folders"):
        rp.run(rp.Config(compare=str(runs["fp32"]), out=str(tmp_path / "a")))
    with pytest.raises(de.DualencError, match="only --out may be given with it"):
        rp.parse_args(["--compare", f"{runs['fp32']},{runs['bf16']}", "--seeds", "2"])


def test_a_share_whose_denominator_may_be_zero_is_undefined_and_unclear():
    seed = fake_seed(joint_kl=1.0, noise=0.05)  # the joint model gains nothing over the SAE
    rows = {c["claim"]: c["readings"] for c in rp.claims([seed])}
    share = rows["nonlinear part alone, share of the joint model's KL gain"]["fair"]
    assert share["value"] is None and share["ci"] is None and share["verdict"] == "unclear"
    assert "contains 0" in share["undefined"]
    defined = {c["claim"]: c["readings"] for c in rp.claims([fake_seed()])}
    assert (defined["nonlinear part alone, share of the joint model's KL gain"]["fair"]["value"]
            == pytest.approx(0.2))


@pytest.mark.slow  # takes long on its own
def test_each_program_reads_the_others_run_folders(tiny_method_run, tiny_run, tmp_path):
    method_out, method = tiny_method_run
    shutil.copytree(method_out, tmp_path / "run")
    # trains the two baselines it lacks
    extended = rp.run(rp.Config(resume=str(tmp_path / "run"), device="cpu"))
    assert (set(extended["models"]) >= {"sae_matched", "joint_no_linear"}
            and extended["analysis"]["claims"])
    assert extended["curves"]["joint"] == method["curves"]["joint"]
    referee_out, referee = tiny_run
    # the method's three models of it
    again = runner.run(runner.RunConfig(eval_only=str(referee_out), device="cpu"))
    assert list(again["models"]) == list(runner.RunConfig.STAGES)
    assert again["models"]["joint"]["fvu"] == pytest.approx(referee["models"]["joint"]["fvu"],
                                                            rel=1e-5)
