"""Tests for stages34.py, the paper's stages 3-4, written as examples of its API: the secondary SAE
on the joint NFM's hidden layer, the integration pipeline and its scaling, the stimulus design, and
stages 3-4 on a tiny run. Its tiny models and the referee's tiny run are conftest.py's."""

import json

import pytest
import torch
import torch.nn.functional as F

import dualenc as de
from referee import language_model
from referee import replicate as rp
from referee import stages34 as s34
from referee import stats as st
from conftest import D, FEATS, K, M, small_cfg, synthetic_acts, tiny_llama


# ----------------------------------------------------------------------------- secondary SAE

def tiny_joint_and_secondary(x, paper_density=False):
    torch.manual_seed(0)
    joint = de.DualEncoder(de.TopKSAE(D, FEATS, K), de.NFM(FEATS, D, M, n_read=K))
    de.train_joint(joint, x, x, small_cfg())
    secondary, curve, h_eval = s34.train_secondary(joint, x, x, small_cfg(), paper_density)
    return joint.eval(), secondary.eval(), curve, h_eval


def test_secondary_sae_learns_the_interaction_hidden_layer():
    x = synthetic_acts()
    joint, secondary, curve, h_eval = tiny_joint_and_secondary(x)
    assert secondary.sae.W_dec.shape == (25 * M, M) and secondary.sae.k == round(M * 250 / 300)
    assert curve[-1]["train_mse"] < curve[0]["train_mse"] and curve[-1]["fvu"] < curve[0]["fvu"]
    torch.testing.assert_close(secondary.normalize(s34.interaction_hidden(joint, x)), h_eval)
    # the pipeline with the secondary SAE in place reconstructs x,
    # a little worse than the joint model
    pipeline = s34.IntegrationPipeline(joint, secondary).eval()
    assert de.evaluate(joint, x)["fvu"] <= de.evaluate(pipeline, x)["fvu"] < 1
    _, paper, _, _ = tiny_joint_and_secondary(x, paper_density=True)  # the paper's code: 2 % active
    assert paper.sae.W_dec.shape == (25 * M, M) and paper.sae.k == round(0.02 * 25 * M)


def test_an_integration_features_pairs_and_constant_give_back_its_pre_activation():
    x = synthetic_acts()
    joint, secondary, _, _ = tiny_joint_and_secondary(x)
    z_BM = secondary.normalize(s34.interaction_hidden(joint, x[:64]))
    for g in (0, 7):
        const, idx_BR, pairs_BRR = s34.pair_reading(joint, secondary, x[:64], g)
        direct_B = z_BM @ secondary.sae.W_enc[:, g] + secondary.sae.b_enc[g]
        torch.testing.assert_close(const + pairs_BRR.sum((1, 2)), direct_B, rtol=1e-5, atol=1e-5)
        assert idx_BR.shape == (64, K) and (pairs_BRR.tril() == 0).all()  # each pair once, i < j


def test_control_b_reads_the_primary_features_that_raise_the_feature_through_pair():
    x = synthetic_acts(n=256)
    joint, secondary, _, _ = tiny_joint_and_secondary(x)
    states = [x[i:i + 16] * joint.std_D + joint.mean_D for i in range(0, 64, 16)]  # raw
    feature = int(s34.firing_counts(secondary.sae, s34.interaction_hidden(joint, x)).argmax())
    chosen = s34.pair_inputs(joint, secondary, states, feature, n=3)
    share = torch.zeros(FEATS, dtype=torch.float64)  # the same sum, feature by feature
    for h in states:
        _, idx, terms = s34.pair_reading(joint, secondary, joint.normalize(h), feature)
        for i in idx.unique().tolist():
            share[i] += terms[(idx == i)[:, :, None] | (idx == i)[:, None, :]].sum().item() / 2
    assert chosen and chosen == [f for f in share.topk(3).indices.tolist() if share[f] > 0]


def test_scaling_by_one_or_a_silent_feature_by_zero_changes_nothing():
    x = synthetic_acts(n=256)
    joint, secondary, _, _ = tiny_joint_and_secondary(x)
    pipeline = s34.IntegrationPipeline(joint, secondary).eval()
    with torch.no_grad():
        base = pipeline(x)
        active = pipeline.secondary_codes(x)
        busy, silent = (int(active.count_nonzero(0).argmax()),
                        int((active.count_nonzero(0) == 0).nonzero()[0]))
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
        assert (not torch.allclose(scaled[touched], base[touched])
                and torch.equal(scaled[~touched], base[~touched]))
        # the same, written out: x_s and linear(f) as they were,
        # pair(f) reads its codes from the scaled f
        pair_input = joint.nfm.read(torch.where(idx == feature, 0.0, vals), idx)
        expected = joint.sae.decode(vals, idx) + joint.nfm.linear(*joint.nfm.read(vals, idx)) + \
            joint.nfm.interaction(pipeline.through_secondary(joint.nfm.hidden(*pair_input)))
        torch.testing.assert_close(scaled, expected)
    # and through the LM: x1 leaves the next-token log-probabilities where they were
    lm, ids = tiny_llama(), torch.randint(0, 97, (3, 10))
    joint_lm, secondary_lm = (
        de.DualEncoder(de.TopKSAE(32, FEATS, K), de.NFM(FEATS, 32, M)).eval(), None)
    secondary_lm = de.DualEncoder(de.TopKSAE(M, 25 * M, 8), None).eval()
    pipe = s34.IntegrationPipeline(joint_lm, secondary_lm).eval()
    prompts, words = [(i, 0) for i in ids], {c: torch.tensor([1, 2, 3]) for c in "abcd"}

    def keep_fn(h):
        return torch.ones(h.shape[:-1], dtype=torch.bool)

    # batched, padded and run from block 2's cached output: each prompt as the LM reads it alone
    uneven = [(ids[0], 0), (ids[1, :6], 1), (ids[2, :8], 2)]
    as_is = type("Identity", (), {"reconstruct": staticmethod(lambda h: h)})()
    alone = torch.stack([F.log_softmax(lm(i[None]).logits[0, -1], -1) for i, _ in uneven])
    torch.testing.assert_close(
        s34.word_logprobs(lm, 2, s34.prompt_batch(lm, 2, uneven), words, as_is, keep_fn),
        torch.stack([alone[:, w].mean(-1) for w in words.values()], -1).double(),
        rtol=0, atol=1e-5)
    prompts = s34.prompt_batch(lm, 2, prompts)
    base = s34.word_logprobs(lm, 2, prompts, words, pipe, keep_fn)
    changes, inter = s34.intervention_effect(lm, 2, prompts, words, pipe, keep_fn,
                                             ("secondary", torch.tensor([0])), base)
    assert pipe.scale is None  # the pipeline is left unscaled
    with s34.scaling(pipe, ("secondary", torch.tensor([0]), 1.0)):
        torch.testing.assert_close(s34.word_logprobs(lm, 2, prompts, words, pipe, keep_fn), base,
                                   rtol=0, atol=1e-5)
    with pytest.raises(KeyboardInterrupt), s34.scaling(pipe, ("secondary", torch.tensor([0]), 2.0)):
        raise KeyboardInterrupt  # an interrupted intervention leaves no scale behind
    assert pipe.scale is None
    assert set(changes) == set(s34.SCALES) and inter[0.0].shape == (3,)


# ----------------------------------------------------------------------------- stimuli

@pytest.mark.parametrize("content, msg", [
    ("{not json", "stimuli"), ('{"factors": {"a": ["x", "y"]}}', "not a 2 x 2 design"),
    ('{"factors": {"a": ["x", "y"], "b": ["u", "v"]}, "prompts": {}, "words": {}}',
     "not a 2 x 2 design"),
    (json.dumps({"factors": {"a": ["x", "y"], "b": ["u", "v"]},
                 "prompts": {c: ["p"] * 3 for c in ("x u", "x v", "y u", "y v")}, "items": [],
                 "words": {c: ["w"] for c in ("x u", "x v", "y u", "y v")}}),
     "at least 4 prompts"),
    (json.dumps({"factors": {"a": ["x", "y"], "b": ["u", "v"]},
                 "prompts": {c: ["p"] * 4 for c in ("x u", "x v", "y u", "y v")},
                 "items": [{"id": "i", **{c: "q" for c in ("x u", "x v", "y u", "y v")}}] * 8,
                 "words": {c: ["w"] for c in ("x u", "x v", "y u", "y v")}}),
     "at least 8 items with distinct ids")])
def test_a_malformed_stimulus_file_fails_with_one_line(content, msg, tmp_path):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(de.DualencError, match=msg) as err:
        s34.read_stimuli(path)
    assert "\n" not in str(err.value)


@pytest.mark.slow  # the real SmolLM2
def test_the_shipped_stimuli_are_a_full_design_of_single_token_words():
    spec = s34.read_stimuli(None)
    _, tokenizer = language_model.load_lm(de.SMOLLM2, "cpu")
    design = s34.load_stimuli(spec, tokenizer)
    sel_P, cell_P = design["selection_P"], design["cell_P"]
    assert [int((cell_P[sel_P] == i).sum()) for i in range(4)] == [16, 16, 16, 16]
    # 64 matched items, each one situation in all four cells, in cell order
    assert len(spec["items"]) == 64 and len({item["id"] for item in spec["items"]}) == 64
    assert cell_P[~sel_P].tolist() == [0, 1, 2, 3] * 64
    texts = [p for c in spec["cells"] for p in spec["prompts"][c]]
    texts += [item[c] for item in spec["items"] for c in spec["cells"]]
    assert len(set(texts)) == len(texts) == 64 + 4 * 64  # no prompt twice
    assert all(len(w) == 8 for w in design["word_ids"].values())
    bad = {**spec, "words": {**spec["words"], spec["cells"][0]: ["extraordinarily-long-word"]}}
    with pytest.raises(de.DualencError, match="single tokens"):
        s34.load_stimuli(bad, tokenizer)


# ----------------------------------------------------------------------------- on a run

@pytest.mark.slow  # takes long on its own
def test_stage34_on_a_tiny_run_seals_its_plan_before_the_test_items(tiny_run, capsys,
                                                                    monkeypatch):
    out, first = tiny_run
    sealed, judge = [], st.judge_items

    def after_the_plan(*args, **kw):
        sealed.append((out / "stage34_plan.json").exists())
        return judge(*args, **kw)

    monkeypatch.setattr(st, "judge_items", after_the_plan)
    for name in ("N_NULL", "N_CALIBRATION", "N_POWER"):  # the plan's simulations, smaller
        monkeypatch.setattr(s34, name, 200)
    # the random controls run whatever the effect says (in a run, only where it holds)
    monkeypatch.setattr(s34, "RANDOM_CONTROLS_FOR", ("holds", "no", "unclear"))
    report = rp.run(rp.Config(eval_only=str(out), device="cpu", stage34=True))
    assert sealed and all(sealed)
    saved = json.loads((out / "results.json").read_text())
    # added to the run's results.json, whose evaluation stands
    assert saved["stage34"] == json.loads(json.dumps(report["stage34"]))
    assert saved["models"] == json.loads(json.dumps(first["models"]))
    result = report["stage34"]
    (seed,) = result["per_seed"]
    plan = seed["plan"]
    assert json.loads((out / "stage34_plan.json").read_text()) == json.loads(json.dumps(plan))
    assert seed["design"]["selection_prompts_per_cell"] == [16, 16, 16, 16]
    assert seed["design"]["test_items"] == 64
    # the baseline: the same selection and test on every SAE's identity features
    assert set(seed["selectivity"]) == {"integration", "identity_joint", "identity_sae",
                                        "identity_sae_matched"}
    assert all(set(kind) == set(st.CONTRASTS) for kind in seed["selectivity"].values())
    # each carried feature's route, level, own null's calibration and detectable effect, sealed
    for rows in plan["carried"]["integration"].values():
        assert len(rows) == st.N_CARRIED
        for r in rows:
            assert r["route"] in ("mean", "hurdle") and r["level"] == pytest.approx(0.05 / 15)
            assert 0 <= r["null_rejection_rate"] <= 1 and len(r["selection_values"]) == 64
            assert r["mde_sd"] is None or r["mde_sd"] > 0
    # directions and the minimum effect come from the plan, beside each verdict
    selected = plan["interventions"][plan["selected"]]
    assert plan["selected"].endswith(" interaction") and selected["contrast"] == "interaction"
    sign = selected["selection_sign"]
    assert selected["directions"] == {"0": -sign, "2": sign, "4": sign}
    assert selected["min_effect"] == pytest.approx(
        s34.MIN_EFFECT_FRACTION * selected["clean_size"])
    assert set(selected["mde"]) == {"0", "2", "4"}
    assert seed["x1_max_change"] < 1e-5 and list(seed["interventions"])[0] == plan["selected"]
    held = {f"{r['feature']} {name}" for name, c in seed["selectivity"]["integration"].items()
            for r in c["features"] if r["verdict"] == "holds"}
    assert set(seed["interventions"]) == held | {plan["selected"]}
    for f, row in seed["interventions"][plan["selected"]].items():
        assert row["selected"]["direction"] == selected["directions"][f]
        assert row["selected"]["min_effect"] == selected["min_effect"]
        assert set(row["controls"]) == {"random_matched", "primary_read", "shuffled_selection"}
        assert all(c["status"] in ("beyond", "not beyond", "empty")
                   for c in row["controls"].values())
        assert row["verdict"] in ("holds", "no", "unclear")
    controls = selected["controls"]
    assert len(controls["random_matched"]) <= s34.N_CONTROLS
    assert selected["feature"] not in controls["shuffled_selection"] + controls["random_matched"]
    assert result["combined"] == seed["verdicts"]  # one seed: its own verdicts
    assert (out / "stage34.png").read_bytes()[:4] == b"\x89PNG" and (out / "stage34.txt").exists()
    cfg = json.loads((out / "secondary" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post.nfm.hook_interaction_pre_relu"
    assert "stage 4" in capsys.readouterr().out
