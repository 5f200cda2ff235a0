"""Tests of distributed.py: under torchrun, two ranks on gloo train the models one process trains
(the same weights, to the tolerance below), extract the store one process extracts (the same
bytes), and a rank that fails ends the job in one line, after which the run resumes."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dualenc as de
from referee import distributed, training
from referee import replicate as rp
from conftest import our_lines, tiny_method_cfg, tiny_run_cfg, torchrun

# Two ranks sum a batch's gradient in two halves, one process in one: the same arithmetic in
# another order, a few ulps a step. On the tiny run every weight stays within 2e-6 of its
# tensor's largest entry and every FVU within 1e-8 (measured). At --quick a few tokens' top-k
# then picks another feature: the SAE's weights stay within 7e-6 but the NFMs trained on its codes
# drift by up to 0.6 %, and FVU within 1.5e-5 relative (measured; a 2-rank step replayed in one
# process from the 2-rank SAE gives the 2-rank NFM to the bit). Controls that must fail: each
# rank drawing its own dropout mask moves NFM weights by their full size, every rank training on
# the first share moves the SAE's FVU by 2 %.
WEIGHT_TOL = 1e-4  # of each tensor's largest |entry|, on the tiny run
FVU_TOL = 1e-4  # relative


def flags(cfg):
    """The command line that gives `cfg` (its settings that differ from the defaults)."""
    defaults = type(cfg)()
    changed = [f.name for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(defaults, f.name)]
    return [arg for name in changed
            for arg in (f"--{name.replace('_', '-')}", str(getattr(cfg, name)))]


def weights(run, name):
    return {f"{path.name}/{key}": tensor for path in sorted((run / name).glob("*.safetensors"))
            for key, tensor in load_file(path).items()}


def store_files(root):
    (folder,) = Path(root).iterdir()
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.name != "lock"}


def assert_same_models(run, reference, compare_weights=True):
    ours = json.loads((run / "results.json").read_text())["models"]
    theirs = json.loads((reference / "results.json").read_text())["models"]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name]["fvu"] == pytest.approx(theirs[name]["fvu"], rel=FVU_TOL), name
    for name in rp.Config.STAGES if compare_weights else ():
        a, b = weights(run, name), weights(reference, name)
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] - b[key]).abs().max() <= WEIGHT_TOL * b[key].abs().max(), (name, key)


# ----------------------------------------------------------------------------- in one process

def test_a_rank_drops_with_the_shared_dropout_of_its_share():
    # the ranks together drop what one process would: test_training's SharedDropout test
    model = de.DualEncoder(de.TopKSAE(16, 64, 8), de.NFM(64, 16, 12))
    assert distributed.DataParallel().wrap(model) is model
    assert isinstance(model.nfm.dropout, training.SharedDropout)
    assert model.nfm.dropout.share == (0, 1)


def test_one_process_is_a_job_of_one_rank():
    alone, rows = distributed.DataParallel(), torch.arange(10)
    model = torch.nn.Linear(2, 2)
    assert alone.main and alone.wrap(model) is model and torch.equal(alone.share(rows), rows)
    assert alone.gather(torch.tensor(3.0)).tolist() == [3.0] and alone.broadcast("x") == "x"
    assert alone.batches([0, 1, 2]) == [0, 1, 2]


def test_a_batch_that_does_not_split_evenly_drops_its_last_tokens_and_says_so(capsys):
    rows = torch.arange(10)
    assert distributed.DataParallel(2, 3).share(rows).tolist() == [6, 7, 8]
    assert distributed.DataParallel(0, 3).share(rows).tolist() == [0, 1, 2]
    assert "each trains on 3 tokens a step and the batch's last 1 are dropped" in (
        capsys.readouterr().err)
    with pytest.raises(de.DualencError, match="cannot be shared by 3 ranks"):
        distributed.DataParallel(0, 3).share(rows[:2])
    # an extraction's pending batches, dealt in turn: after a partial one, still even shares
    assert distributed.DataParallel(1, 3).batches(list(range(8))) == [1, 4, 7]
    assert distributed.DataParallel(0, 2).batches([1, 3, 5, 7]) == [1, 5]


# ----------------------------------------------------------------------------- under torchrun

def test_two_ranks_train_the_weights_one_process_trains_and_extract_its_store(tiny_lm_folder,
                                                                             tiny_run, tmp_path):
    reference, _ = tiny_run
    cfg = tiny_run_cfg(tiny_lm_folder, tmp_path / "run")
    done, _ = torchrun("referee", *flags(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_models(tmp_path / "run", reference)
    assert store_files(cfg.store) == store_files(f"{reference}_store")


def test_the_method_runs_on_two_ranks_as_in_one_process(tiny_lm_folder, tiny_method_run,
                                                       tmp_path):
    reference, _ = tiny_method_run
    done, _ = torchrun("referee.runner", *flags(tiny_method_cfg(tiny_lm_folder, tmp_path / "run")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_models(tmp_path / "run", reference)
    assert "joint" in done.stdout and "steps per model" in done.stdout  # rank 0's table, once
    assert done.stdout.count("clean ce") == 1


def test_a_batch_that_two_ranks_cannot_share_evenly_runs_and_says_what_it_drops(tiny_lm_folder,
                                                                               tmp_path):
    cfg = tiny_method_cfg(tiny_lm_folder, tmp_path / "run", batch_size=127, epochs=1)
    done, _ = torchrun("referee.runner", *flags(cfg))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("--batch-size 127 over 2 ranks: each trains on 63 tokens a step and "
                             "the batch's last 1 are dropped") == 1


def test_bad_input_under_torchrun_is_one_line(tiny_lm_folder, tmp_path):
    for bad in (["--k", "0"], ["--layer", "9"]):  # refused before, and after, the ranks meet
        cfg = tiny_method_cfg(tiny_lm_folder, tmp_path)
        done, _ = torchrun("referee.runner", *flags(cfg), *bad)
        lines = our_lines(done.stderr, "referee.runner")
        assert done.returncode != 0 and len(lines) == 1, done.stderr


@pytest.mark.slow  # takes long on its own: three jobs
def test_a_killed_rank_ends_the_job_in_one_line_and_the_run_resumes(tiny_lm_folder, tiny_run,
                                                                    tmp_path):
    reference, _ = tiny_run
    cfg = tiny_run_cfg(tiny_lm_folder, tmp_path / "run")
    # rank 1 killed at its second batch of the extraction: the store is left part-written
    killed, seconds = torchrun("referee", *flags(cfg), fault=(1, "kill-extract", 2))
    (line,) = our_lines(killed.stderr)
    assert killed.returncode != 0 and seconds < 90
    assert line.startswith("referee: error: rank 1 ended without a word (killed?)"), line
    done_marks = next(Path(cfg.store).iterdir()) / "done.bin"
    assert 0 < sum(done_marks.read_bytes()) < len(done_marks.read_bytes())
    # the same command completes the store, and rank 1 is killed at its 30th optimiser step,
    # after the sae's evaluation at step 25 saved its state
    killed, seconds = torchrun("referee", *flags(cfg), fault=(1, "kill", 30))
    (line,) = our_lines(killed.stderr)
    assert killed.returncode != 0 and seconds < 90
    assert line == (f"referee: error: rank 1 ended without a word (killed?); every rank stops; "
                    f"finish the run with --resume {cfg.out}")
    resumed, _ = torchrun("referee", "--resume", cfg.out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming sae at step 25" in resumed.stderr
    assert_same_models(Path(cfg.out), reference)
    assert store_files(cfg.store) == store_files(f"{reference}_store")


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tiny_lm_folder, tmp_path):
    cfg = tiny_run_cfg(tiny_lm_folder, tmp_path / "run")
    # at the last step before an evaluation (step 5) only rank 1's loss is NaN: every rank stops
    # (every rank sees it: the line is the first to report's)
    failed, seconds = torchrun("referee", *flags(cfg), fault=(1, "nan", 5))
    (line,) = our_lines(failed.stderr)
    assert failed.returncode != 0 and seconds < 90
    assert re.fullmatch(r"referee: error: rank [01]: sae: training loss became nan on rank 1 "
                        r"at step 5", line), line


@pytest.mark.slow  # the real SmolLM2
def test_two_ranks_of_the_quick_run_give_its_models_and_its_store(quick_run, tmp_path):
    done, _ = torchrun("referee", "--quick", "--out", str(tmp_path / "run"), "--store",
                       str(tmp_path / "store"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_models(tmp_path / "run", quick_run, compare_weights=False)
    assert store_files(tmp_path / "store") == store_files(f"{quick_run}_store")


def test_a_bug_ends_the_job_with_one_traceback_and_blames_no_rank(tiny_lm_folder, tmp_path):
    cfg = tiny_method_cfg(tiny_lm_folder, tmp_path / "run")
    # on every rank at once, and on rank 0 alone after the others have finished their work
    for fault in ((None, "bug", 7), (0, "bug-splice", 1)):
        failed, _ = torchrun("referee.runner", *flags(cfg), fault=fault)
        assert failed.returncode != 0 and our_lines(failed.stderr, "referee.runner") == []
        assert failed.stderr.count("RuntimeError: a planted bug") == 1, failed.stderr[-3000:]


def test_eval_only_under_torchrun_is_rank_0_alone(tiny_run, tmp_path):
    reference, _ = tiny_run
    shutil.copytree(reference, tmp_path / "run")
    done, _ = torchrun("referee", "--eval-only", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((tmp_path / "run" / "results_eval_only.json").read_text())["models"]
    first = json.loads((reference / "results.json").read_text())["models"]
    assert again == first
