"""Tests of store.py: activations on disk give the method's tokens, extracted once, resumable,
locked, refused when they do not match their key."""

import json
import shutil
import threading

import pytest
import torch
import transformers

import dualenc as de
from referee import runner, store
from referee import replicate as rp
from conftest import tiny_llama, tiny_run_cfg


# ----------------------------------------------------------------------------- the activation store

def store_data(model, root, monkeypatch=None, fail_at=None, **kw):
    """store.load_data on a tiny run whose store lies under `root`; with fail_at=(call, exception),
    the extraction's call-th batch raises that exception instead."""
    if fail_at is not None:
        calls, extract = [], de.extract_activations

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == fail_at[0]:
                raise fail_at[1]
            return extract(*args, **kwargs)
        monkeypatch.setattr(de, "extract_activations", failing)
    cfg = tiny_run_cfg(model, root / "run", store=str(root), **kw)
    _, _, data = store.load_data(cfg, 2, torch.device("cpu"))
    if fail_at is not None:
        monkeypatch.setattr(de, "extract_activations", extract)
    return data


def store_bytes(root):
    (folder,) = root.iterdir() if root.exists() else [root]
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_the_store_gives_the_methods_training_tokens_and_is_read_not_extracted_again(
        tiny_lm_folder, tmp_path, monkeypatch):
    stored = store_data(tiny_lm_folder, tmp_path / "store")
    cfg = tiny_run_cfg(tiny_lm_folder, tmp_path / "run")
    _, _, in_ram = runner.load_data(cfg, 2, torch.device("cpu"))
    for name in ("mean", "std", "splice_acts"):
        torch.testing.assert_close(getattr(stored, name), getattr(in_ram, name),
                                   rtol=1e-5, atol=1e-5)
    for on_disk, in_memory in ((stored.x_train, in_ram.x_train), (stored.x_eval, in_ram.x_eval)):
        assert len(on_disk) == len(in_memory) and on_disk.shape == in_memory.shape
        every = torch.arange(len(in_memory))  # read from disk, batch by batch
        torch.testing.assert_close(on_disk[every], in_memory, rtol=1e-5, atol=1e-5)
        assert torch.equal(torch.cat(list(on_disk.split(1000))), on_disk[every])
    assert stored.corpus_sha1 == in_ram.corpus_sha1
    monkeypatch.setattr(de, "extract_activations", lambda *a, **k: pytest.fail("extracted again"))
    again = store_data(tiny_lm_folder, tmp_path / "store")
    assert torch.equal(again.x_eval[every], stored.x_eval[every])


def test_an_interrupted_extraction_resumes_to_the_same_bytes(tiny_lm_folder, tmp_path, monkeypatch):
    store_data(tiny_lm_folder, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        store_data(tiny_lm_folder, tmp_path / "cut", monkeypatch, fail_at=(3, KeyboardInterrupt()))
    with open(next((tmp_path / "cut").iterdir()) / "acts.bin", "ab") as f:
        f.write(b"half a batch written when the process was killed")
    store_data(tiny_lm_folder, tmp_path / "cut")
    assert store_bytes(tmp_path / "cut") == store_bytes(tmp_path / "whole")


def test_a_full_disk_stops_with_one_line_and_leaves_an_unfinished_store(tiny_lm_folder, tmp_path,
                                                                        monkeypatch):
    full = OSError(28, "No space left on device")
    with pytest.raises(de.DualencError, match="No space left on device.*resumes") as e:
        store_data(tiny_lm_folder, tmp_path / "store", monkeypatch, fail_at=(2, full))
    assert "\n" not in str(e.value)
    done = (next((tmp_path / "store").iterdir()) / "done.bin").read_bytes()
    assert 0 < sum(done) < len(done)  # not a store that looks complete
    store_data(tiny_lm_folder, tmp_path / "store")  # space freed: it finishes
    store_data(tiny_lm_folder, tmp_path / "whole")
    assert store_bytes(tmp_path / "store") == store_bytes(tmp_path / "whole")


def test_a_store_of_the_wrong_size_or_of_another_key_is_refused(tiny_lm_folder, tmp_path):
    store_data(tiny_lm_folder, tmp_path / "store")
    folder = next((tmp_path / "store").iterdir())
    acts = (folder / "acts.bin").read_bytes()
    for wrong in (acts[:-1000], acts + acts[:1000]):  # a finished store has exactly its size
        (folder / "acts.bin").write_bytes(wrong)
        with pytest.raises(de.DualencError,
                           match=f"has {len(wrong):,} bytes in acts.bin where {len(acts):,} are"):
            store_data(tiny_lm_folder, tmp_path / "store")
    (folder / "acts.bin").write_bytes(acts)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "key": {**meta["key"], "layer": 1}}))
    with pytest.raises(de.DualencError, match="another key"):
        store_data(tiny_lm_folder, tmp_path / "store")


def test_the_store_key_is_the_models_weights_not_how_they_were_loaded():
    lm, windows_NT, cfg = tiny_llama(), torch.arange(64).view(2, 32), rp.Config()
    key = store.store_key(cfg, lm, 2, windows_NT)
    lm.config.quantization_config = {"gguf_file": "model.Q4_1.gguf"}  # loaded from a GGUF file
    lm.config._name_or_path = "/somewhere/else"
    assert store.store_key(cfg, lm, 2, windows_NT) == key
    with torch.no_grad():
        lm.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert store.store_key(cfg, lm, 2, windows_NT)["weights"] != key["weights"]


def test_a_model_folder_overwritten_by_other_weights_gets_a_store_of_its_own(tiny_lm_folder,
                                                                            tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_lm_folder, folder)
    first = store_data(str(folder), tmp_path / "store")
    lm = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        lm.model.layers[0].mlp.down_proj.weight.mul_(2)  # the same architecture, another checkpoint
    lm.save_pretrained(folder)
    second = store_data(str(folder), tmp_path / "store")
    every = torch.arange(len(first.x_eval))
    assert (len(list((tmp_path / "store").iterdir())) == 2
            and not torch.equal(first.x_eval[every], second.x_eval[every]))


def test_two_extractions_of_one_key_started_together_write_the_store_once(tiny_lm_folder, tmp_path,
                                                                          monkeypatch):
    store_data(tiny_lm_folder, tmp_path / "single")
    second_arrived, extract, write = (threading.Event(), de.extract_activations,
                                      store.ActivationStore.extract)
    callers = []

    # the second extraction reaches the store while the first is writing it
    def arriving(store, *args):
        callers.append(1)
        if len(callers) == 2:
            second_arrived.set()
        return write(store, *args)

    # the first extraction's batches wait until the second has arrived
    def waiting(*args, **kwargs):
        assert second_arrived.wait(timeout=60)
        return extract(*args, **kwargs)
    monkeypatch.setattr(store.ActivationStore, "extract", arriving)
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
    full, half = (store_data(tiny_lm_folder, tmp_path / dtype, store_dtype=dtype)
                  for dtype in ("float32", "float16"))
    assert (2 * len(store_bytes(tmp_path / "float16")["acts.bin"])
            == len(store_bytes(tmp_path / "float32")["acts.bin"]))
    torch.testing.assert_close(half.splice_acts, full.splice_acts, rtol=1e-3, atol=1e-3)
    with pytest.raises(de.DualencError, match="store-dtype"):
        rp.Config(store_dtype="int8")


def test_a_bf16_extraction_gets_a_store_of_its_own_close_to_fp32s(tiny_lm_folder, tmp_path):
    fp32, bf16 = (store_data(tiny_lm_folder, tmp_path / "store", extract_precision=p)
                  for p in ("fp32", "bf16"))
    metas = (tmp_path / "store").glob("*/meta.json")
    keys = [json.loads(meta.read_text())["key"] for meta in metas]
    assert sorted(k["lm_precision"] for k in keys) == ["bf16", "fp32"]
    assert not torch.equal(bf16.splice_acts, fp32.splice_acts)
    assert (bf16.splice_acts - fp32.splice_acts).norm() <= 0.02 * fp32.splice_acts.norm()


def test_the_curve_reads_the_first_held_out_windows_and_the_end_reads_all(tiny_lm_folder,
                                                                         tmp_path):
    data = store_data(tiny_lm_folder, tmp_path / "store", curve_windows=3)
    first = torch.nonzero(data.eval_window < 3)[:, 0]
    assert 0 < len(data.x_curve) == len(first) < len(data.x_eval)
    assert torch.equal(data.x_curve, data.x_eval[first])
    everything = store_data(tiny_lm_folder, tmp_path / "store", curve_windows=10_000)
    assert torch.equal(everything.x_curve, data.x_eval[torch.arange(len(data.x_eval))])

