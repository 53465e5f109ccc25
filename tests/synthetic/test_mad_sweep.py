"""The MAD trainer (issue 22) on CPU at toy sizes: the (lr, weight decay, seed) grid trains as
one vmapped group with distinct runs, MAD's per-epoch cosine schedule, an interrupted run resumed
from its saved state equals the uninterrupted run, the 0.999 stop freezes runs, the macro
accuracy follows torchmetrics' rule, and the benchmark CLI (--smoke, the auto-encoder task)
writes its table and resumes; a wall-clock budget stops at an epoch boundary and the rerun
resumes to the uninterrupted run; --parallel workers give the serial results (a failing item
is reported and the others go on); runs that stop leave the grid (the rest train on as a smaller
one, to the same curves, and resume); --speed times an epoch per item and keeps nothing; the
workdir archive (--pack/--unpack) round-trips, state
included, and merges by progress; bad flags fail with one line before anything is written."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from sh2_jax.train import mad_archive, mad_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
KW = dict(vocab_size=16, seq_len=16, num_train_examples=40)
CFG = mad_sweep.MADTrainConfig(d_model=16, num_heads=2, mlp_hidden=32, batch_size=16, epochs=3,
                               learning_rates=(1e-3,), weight_decays=(0.0, 0.1), seeds=(0, 1),
                               dtype="float32", num_test_examples=32)


class _Stop(Exception):
  pass


def _interrupt_after(cfg, workdir, epoch: int):
  """Train cfg's toy setting in ``workdir`` and stop it (an exception) once epoch ``epoch`` is
  logged, i.e. after that epoch's state was saved."""
  def log(msg):
    if f"epoch {epoch}/" in msg:
      raise _Stop
  with pytest.raises(_Stop):
    mad_sweep.train_setting(cfg, "in_context_recall", "toy", KW, "MHA", str(workdir), log=log)


def _curves(rec):
  return [[(c["epoch"], c["train_loss"], c["test_acc"], c["test_loss"]) for c in r["curve"]]
          for r in rec["runs"]]


def test_grid_resume_and_schedule(tmp_path):
  full = mad_sweep.train_setting(CFG, "in_context_recall", "toy", KW, "MHA", str(tmp_path / "a"),
                                 log=lambda s: None)
  assert full["complete"] and len(full["runs"]) == 4
  assert [(r["lr"], r["weight_decay"], r["seed"]) for r in full["runs"]] == [
      (1e-3, 0.0, 0), (1e-3, 0.0, 1), (1e-3, 0.1, 0), (1e-3, 0.1, 1)]
  losses = [r["curve"][-1]["train_loss"] for r in full["runs"]]
  assert len(set(losses)) == 4  # four different runs (seeds: inits; weight decays)
  lrs = [c["lr"] for c in full["runs"][0]["curve"]]
  cos = lambda e: 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * e / 3)) / 2
  np.testing.assert_allclose(lrs, [cos(0), cos(1), cos(2)], rtol=1e-6)
  assert full["best"]["test_acc"] == max(r["test_acc"] for r in full["runs"])
  for r in full["runs"]:  # MAD's score: the epoch with the lowest test loss; the final beside it
    low = min(r["curve"], key=lambda c: c["test_loss"])
    assert (r["test_acc"], r["best_epoch"]) == (low["test_acc"], low["epoch"])
    assert r["test_acc_final"] == r["curve"][-1]["test_acc"]
  # a run trained alone is the same run as its slot of the vmapped grid
  alone_cfg = mad_sweep.MADTrainConfig(**{**CFG.__dict__, "weight_decays": (0.1,),
                                          "seeds": (1,)})
  alone = mad_sweep.train_setting(alone_cfg, "in_context_recall", "toy", KW, "MHA",
                                  str(tmp_path / "c"), log=lambda s: None)
  np.testing.assert_allclose(np.asarray(_curves(alone)[0]), np.asarray(_curves(full)[3]),
                             rtol=2e-4, atol=1e-5)

  _interrupt_after(CFG, tmp_path / "b", 1)
  run_dir = tmp_path / "b" / "in_context_recall" / "toy" / "MHA"
  assert int(np.load(run_dir / "state_g0.npz")["epoch"]) == 1
  assert [len(r["curve"]) for r in json.load(open(run_dir / "curves.json"))["runs"]] == [1] * 4
  resumed = mad_sweep.train_setting(CFG, "in_context_recall", "toy", KW, "MHA",
                                    str(tmp_path / "b"), log=lambda s: None)
  assert resumed["complete"]
  np.testing.assert_allclose(np.asarray(_curves(resumed)), np.asarray(_curves(full)),
                             rtol=1e-6, atol=1e-7)
  # another configuration in the same place is refused, not mixed in
  other = mad_sweep.MADTrainConfig(**{**CFG.__dict__, "epochs": 4})
  with pytest.raises(ValueError, match="another configuration"):
    mad_sweep.train_setting(other, "in_context_recall", "toy", KW, "MHA", str(tmp_path / "b"))


def test_threshold_stop_freezes_runs(tmp_path):
  cfg = mad_sweep.MADTrainConfig(**{**CFG.__dict__, "stop_acc": 0.0})
  rec = mad_sweep.train_setting(cfg, "in_context_recall", "toy", KW, "MHA", str(tmp_path),
                                log=lambda s: None)
  assert rec["complete"] and all(len(r["curve"]) == 1 for r in rec["runs"])


def test_stopped_runs_leave_the_grid(tmp_path, monkeypatch):
  """Runs stopping at epochs 1 and 2 of 4: after epoch 2 the two left go on as a grid of two
  (the saved state holds those two), and every curve is the one the full grid trains; a run
  interrupted after the compaction resumes to the same curves."""
  cfg = mad_sweep.MADTrainConfig(**{**CFG.__dict__, "epochs": 4})
  stop_at = {(0.0, 0): 1, (0.0, 1): 2}  # (weight decay, seed) -> last epoch
  real = mad_sweep.run_done
  monkeypatch.setattr(mad_sweep, "run_done", lambda c, r: real(c, r) or r["curve"][-1]["epoch"]
                      == stop_at.get((r["weight_decay"], r["seed"])))
  whole = mad_sweep.MADTrainConfig(**{**cfg.__dict__, "compact_runs": False})
  ref = mad_sweep.train_setting(whole, "in_context_recall", "toy", KW, "MHA",
                                str(tmp_path / "ref"), log=lambda s: None)
  assert [len(r["curve"]) for r in ref["runs"]] == [1, 2, 4, 4]
  held = []
  real_save = mad_sweep._save
  monkeypatch.setattr(mad_sweep, "_save", lambda path, state: (
      held.append((int(state["epoch"]), state["held"].tolist(), state["leaf_0"].shape[0]))
      if "held" in state else None, real_save(path, state))[1])
  got = mad_sweep.train_setting(cfg, "in_context_recall", "toy", KW, "MHA", str(tmp_path / "c"),
                                log=lambda s: None)
  assert held == [(1, [0, 1, 2, 3], 4), (2, [2, 3], 2), (3, [2, 3], 2), (4, [2, 3], 2)]
  assert got["complete"] and got["best"]["test_acc"] == pytest.approx(ref["best"]["test_acc"])
  for a, b in zip(_curves(got), _curves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-5)

  _interrupt_after(cfg, tmp_path / "i", 3)
  state = np.load(tmp_path / "i" / "in_context_recall" / "toy" / "MHA" / "state_g0.npz")
  assert int(state["epoch"]) == 3 and state["held"].tolist() == [2, 3]
  resumed = mad_sweep.train_setting(cfg, "in_context_recall", "toy", KW, "MHA",
                                    str(tmp_path / "i"), log=lambda s: None)
  np.testing.assert_allclose(np.asarray(_curves(resumed)[2:]), np.asarray(_curves(got)[2:]),
                             rtol=1e-6, atol=1e-7)
  assert _curves(resumed)[:2] == _curves(got)[:2]


def test_macro_accuracy_rule():
  # classes 0..3: 0 twice right, 1 once right once wrong (predicted 3); 2 never occurs;
  # 3 occurs only as a prediction -> recall 0 but counted (torchmetrics: tp + fp + fn > 0)
  tp = np.array([2., 1., 0., 0.])
  support = np.array([2., 2., 0., 0.])
  predicted = np.array([2., 1., 0., 1.])
  got = float(mad_sweep.macro_accuracy(tp, support, predicted))
  assert got == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_layouts_depth():
  for name, ops in mad_sweep.LAYOUTS.items():
    cfg = CFG.model_config(name, 16, 16)
    assert cfg.layer_types[:len(ops.split("-"))] == tuple(ops.split("-"))
    assert cfg.num_layers == max(2, len(ops.split("-")))
  with pytest.raises(ValueError, match="layout 'XX' is not one of"):
    CFG.model_config("XX", 16, 16)


def _cli(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "mad.py"), *args],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_cli_smoke_autoencoder_and_resume(tmp_path):
  args = ["--smoke", f"--workdir={tmp_path}", "--tasks=compression", "--layouts=Hyena-SE",
          f"--curves={tmp_path / 'curves.json'}"]
  if HAVE_MPL:
    args.append(f"--plot={tmp_path / 'mad.png'}")
  proc = _cli(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.load(open(tmp_path / "results.json"))
  entry = out["results"]["compression"]["baseline"]["Hyena-SE"]
  assert entry["complete"] and entry["epochs"] == 2 and 0 <= entry["best"]["test_acc"] <= 1
  # the curves file: every run's per-epoch values; its best epoch's accuracy is the result's
  cur = json.load(open(tmp_path / "curves.json"))
  assert cur["command"] == out["command"] and cur["date"] == out["date"]
  item = cur["curves"]["compression"]["baseline"]["Hyena-SE"]
  assert item["complete"] and len(item["runs"]) == len(entry["runs"])
  for run, res in zip(item["runs"], entry["runs"]):
    assert all(len(run[k]) == 2 for k in ("train_loss", "test_loss", "test_acc"))
    assert np.isclose(run["test_acc"][run["best_epoch"] - 1], res["test_acc"], rtol=1e-3)
  assert out["command"].startswith("mad.py --smoke") and out["date"]
  assert "| compression | Hyena-SE |" in proc.stdout and "| n/a | 0.452 | 0.472 |" in proc.stdout
  assert not HAVE_MPL or (tmp_path / "mad.png").stat().st_size > 1000
  assert (tmp_path / "compression" / "baseline" / "data.npz").exists()
  again = _cli(*args)  # finished: read back, nothing retrained
  assert again.returncode == 0 and " epoch 1/" not in again.stdout


def test_cli_speed_times_and_keeps_nothing(tmp_path):
  out = tmp_path / "speed.jsonl"
  proc = _cli("--smoke", f"--workdir={tmp_path / 'w'}", "--tasks=in_context_recall",
              "--layouts=Hyena-SE,MHA", "--speed=2", "--conv_impl=xla", f"--json={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text())
  assert [r["layout"] for r in row["speed"]] == ["Hyena-SE", "MHA"]
  assert all(r["ms_per_step"] > 0 and r["compile_s"] > 0 and r["runs"] == 2 for r in row["speed"])
  assert row["config"]["conv_impl"] == "xla" and "| in_context_recall | MHA | xla/" in proc.stdout
  assert "--json=speed.jsonl" in row["command"] and str(tmp_path) not in row["command"]
  assert not (tmp_path / "w" / "results.json").exists()
  assert not list((tmp_path / "w").rglob("curves.json"))


@pytest.mark.parametrize("flag,msg", [("--layouts=MHA,XX", "layout 'XX' is not one of"),
                                      ("--tasks=recall", "task 'recall' is not one of"),
                                      ("--settings=seq_len=7", "setting 'seq_len=7' of"),
                                      ("--lrs=1e-3,fast", "--lrs '1e-3,fast' is not"),
                                      ("--plot=p.png", "--plot 'p.png' needs matplotlib"),
                                      ("--attention_impl=cudnn", "cudnn needs a GPU"),
                                      ("--conv_impl=pallas", "'pallas' needs a GPU backend"),
                                      ("--li_impl=modal_scan", "'modal_scan' needs a GPU"),
                                      ("--conv_impl=fast", "invalid choice: 'fast'"),
                                      ("--speed=-1", "--speed -1 must be a non-negative"),
                                      ("--epochs=0", "--epochs 0 must be a positive"),
                                      ("--parallel=0", "--parallel 0 must be a positive"),
                                      ("--budget_s=-1", "--budget_s -1 must be a non-negative"),
                                      ("--budget_s=nan", "--budget_s nan must be a non-negative"),
                                      ("--save_every_s=-2", "--save_every_s -2 must be"),
                                      ("--unpack=gone.tar.gz", "'gone.tar.gz' does not exist"),
                                      ("--pack=nowhere/a.tar.gz", "the folder"),
                                      ("--pack_volumes=0", "--pack_volumes 0 must be 1 to 7"),
                                      ("--merge=gone.json", "--merge 'gone.json' does not exist"),
                                      ("--merge_curves=c.json", "needs --merge"),
                                      ("--curves=nowhere/c.json", "the folder"),
                                      ("--pack=WORKDIR/a.tar.gz", "is inside --workdir")])
def test_cli_bad_flags(tmp_path, flag, msg):
  if flag.startswith("--plot") and HAVE_MPL:
    pytest.skip("matplotlib is installed: --plot works")
  proc = _cli(f"--workdir={tmp_path / 'w'}", "--tasks=in_context_recall",
              flag.replace("WORKDIR", str(tmp_path / "w")))
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("error: ") and msg in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_cli_merge_takes_an_earlier_calls_finished_items(tmp_path):
  """--merge: a fresh workdir takes the finished items of an earlier results file as they are
  (results, table, and with --merge_curves their curves) and trains only the rest; a file of
  another protocol or a curves file of another call is refused with one line."""
  a = ["--smoke", "--tasks=in_context_recall", f"--workdir={tmp_path / 'a'}",
       "--layouts=MHA,Hyena-SE", f"--curves={tmp_path / 'a.json'}"]
  first = _cli(*a)
  assert first.returncode == 0, first.stderr[-3000:]
  merge = [f"--merge={tmp_path / 'a' / 'results.json'}", f"--merge_curves={tmp_path / 'a.json'}"]
  b = ["--smoke", "--tasks=in_context_recall", f"--workdir={tmp_path / 'b'}",
       "--layouts=MHA,Hyena-SE,Hyena-LI", f"--curves={tmp_path / 'b.json'}", *merge]
  second = _cli(*b)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "merge: 2 finished items from results.json" in second.stdout
  trained = {line.split()[2] for line in second.stdout.splitlines() if " epoch 1/" in line}
  assert trained == {"Hyena-LI"}, second.stdout[-3000:]
  ra = json.load(open(tmp_path / "a" / "results.json"))
  rb = json.load(open(tmp_path / "b" / "results.json"))
  for lay in ("MHA", "Hyena-SE"):
    assert rb["results"]["in_context_recall"]["baseline"][lay] == \
        ra["results"]["in_context_recall"]["baseline"][lay]
  assert rb["results"]["in_context_recall"]["baseline"]["Hyena-LI"]["complete"]
  assert rb["merged"]["date"] == ra["date"] and rb["unfinished"] == []
  assert sorted(lay for _, _, lay in rb["merged"]["items"]) == ["Hyena-SE", "MHA"]
  assert "| in_context_recall | Hyena-LI |" in rb["table"]
  ca = json.load(open(tmp_path / "a.json"))["curves"]["in_context_recall"]["baseline"]
  cb = json.load(open(tmp_path / "b.json"))
  assert cb["merged"]["items"] == rb["merged"]["items"]
  assert cb["curves"]["in_context_recall"]["baseline"]["MHA"] == ca["MHA"]
  assert cb["curves"]["in_context_recall"]["baseline"]["Hyena-LI"]["complete"]
  other = _cli(*b[:-2], f"--workdir={tmp_path / 'c'}", merge[0], "--lrs=0.01")
  assert other.returncode == 2 and not (tmp_path / "c").exists()
  assert other.stderr.startswith("error: --merge ") and "another protocol: learning_rates" \
      in other.stderr and len(other.stderr.strip().splitlines()) == 1
  (tmp_path / "x.json").write_text(json.dumps({"date": "then", "command": "x", "curves": {}}))
  wrong = _cli(*b[:-1], f"--merge_curves={tmp_path / 'x.json'}", f"--workdir={tmp_path / 'c'}")
  assert wrong.returncode == 2 and "is from another call (then)" in wrong.stderr
  assert not (tmp_path / "c").exists()


def test_run_scores_take_the_lowest_test_loss():
  curve = [{"epoch": 1, "test_loss": 2.0, "test_acc": 0.5, "test_token_acc": 0.6},
           {"epoch": 2, "test_loss": 1.0, "test_acc": 0.7, "test_token_acc": 0.8},
           {"epoch": 3, "test_loss": 1.5, "test_acc": 0.9, "test_token_acc": 0.95}]
  got = mad_sweep.run_scores(curve)
  assert got == {"test_acc": 0.7, "test_token_acc": 0.8, "best_epoch": 2, "test_acc_final": 0.9,
                 "test_token_acc_final": 0.95}


def _clock(*times):
  """A clock that reads ``times`` in turn, then stays at the last."""
  left = list(times)
  return lambda: left.pop(0) if len(left) > 1 else left[0]


def test_budget_stops_at_an_epoch_boundary_and_resumes(tmp_path):
  full = mad_sweep.train_setting(CFG, "in_context_recall", "toy", KW, "MHA", str(tmp_path / "a"),
                                 log=lambda s: None)
  assert full["timing"]["epochs"] == 3 and not full["timing"]["stopped_by_budget"]
  run_dir = tmp_path / "a" / "in_context_recall" / "toy" / "MHA"
  assert sorted(os.listdir(run_dir)) == ["curves.json"]  # finished: the state is dropped
  # the first epoch may start (t=0, deadline 100); the next would end past the deadline (t=100
  # plus its estimate): stop after epoch 1 with the state saved
  budget = mad_sweep.Budget(100.0, clock=_clock(0.0, 100.0))
  part = mad_sweep.train_setting(CFG, "in_context_recall", "toy", KW, "MHA", str(tmp_path / "b"),
                                 log=lambda s: None, budget=budget)
  assert budget.stopped and part["timing"]["stopped_by_budget"] and not part["complete"]
  assert [len(r["curve"]) for r in part["runs"]] == [1] * 4
  run_dir = tmp_path / "b" / "in_context_recall" / "toy" / "MHA"
  assert int(np.load(run_dir / "state_g0.npz")["epoch"]) == 1
  # saving at most every 1e9 s: nothing saved after epoch 1, the state of epoch 2 at the stop
  budget = mad_sweep.Budget(100.0, clock=_clock(0.0, 0.0, 100.0))
  seen = []
  rare = mad_sweep.train_setting(
      CFG, "in_context_recall", "toy", KW, "MHA", str(tmp_path / "d"), budget=budget,
      save_every_s=1e9, log=lambda s: seen.append(os.listdir(tmp_path / "d" / "in_context_recall"
                                                             / "toy" / "MHA")))
  assert [len(r["curve"]) for r in rare["runs"]] == [2] * 4 and "state_g0.npz" not in seen[0]
  d_dir = tmp_path / "d" / "in_context_recall" / "toy" / "MHA"
  assert int(np.load(d_dir / "state_g0.npz")["epoch"]) == 2
  rest = mad_sweep.train_setting(CFG, "in_context_recall", "toy", KW, "MHA", str(tmp_path / "d"),
                                 log=lambda s: None)
  np.testing.assert_allclose(np.asarray(_curves(rest)), np.asarray(_curves(full)),
                             rtol=1e-6, atol=1e-7)
  # a spent budget starts nothing
  spent = mad_sweep.Budget(100.0, clock=lambda: 101.0)
  assert not spent.allows(0.0) and spent.stopped
  # the workdir as an archive, state included, resumes elsewhere to the uninterrupted run
  archive = str(tmp_path / "b.tar.gz")
  manifest = mad_archive.pack(str(tmp_path / "b"), archive, 2**24, log=lambda s: None)
  assert manifest["items"]["in_context_recall/toy/MHA"] == {"complete": False, "epochs": 1,
                                                            "state": True}
  assert mad_archive.unpack(archive, str(tmp_path / "c"), log=lambda s: None) == {
      "in_context_recall/toy/MHA": "restored"}
  resumed = mad_sweep.train_setting(CFG, "in_context_recall", "toy", KW, "MHA",
                                    str(tmp_path / "c"), log=lambda s: None)
  assert resumed["complete"] and resumed["timing"]["epochs"] == 2
  np.testing.assert_allclose(np.asarray(_curves(resumed)), np.asarray(_curves(full)),
                             rtol=1e-6, atol=1e-7)
  # merging: the workdir's copy that is further along (finished) is kept, an older one replaced
  assert mad_archive.unpack(archive, str(tmp_path / "c"), log=lambda s: None) == {
      "in_context_recall/toy/MHA": "kept"}
  # a limit the state does not fit under: packed without it, named, and it restarts
  said = []
  small = mad_archive.pack(str(tmp_path / "b"), archive, 40_000, log=said.append)
  assert small["items"]["in_context_recall/toy/MHA"]["state"] is False
  assert len(said) == 1 and "restart from epoch 0" in said[0]
  with pytest.raises(mad_archive.ArchiveError, match="over the"):
    mad_archive.pack(str(tmp_path / "b"), archive, 100)
  # the same limit in volumes: the state travels cut across archive, archive.2, ... and resumes
  state = os.path.getsize(tmp_path / "b" / "in_context_recall" / "toy" / "MHA" / "state_g0.npz")
  cut = mad_archive.pack(str(tmp_path / "b"), archive, 40_000, log=lambda s: None,
                         parts=-(-(state + 40_000) // 40_000))
  vols = mad_archive.volumes(archive)
  assert cut["items"]["in_context_recall/toy/MHA"]["state"] is True and len(vols) >= 2
  assert all(os.path.getsize(v) <= 40_000 for v in vols)
  assert mad_archive.unpack(archive, str(tmp_path / "e"), log=lambda s: None) == {
      "in_context_recall/toy/MHA": "restored"}
  again = mad_archive.pack(str(tmp_path / "e"), str(tmp_path / "e.tar.gz"), 2**24,
                           log=lambda s: None)
  assert again["items"]["in_context_recall/toy/MHA"] == cut["items"]["in_context_recall/toy/MHA"]
  # a missing volume is named, not read as a short archive; a shorter archive removes the
  # earlier one's stale volumes
  last = open(vols[-1], "rb").read()
  os.remove(vols[-1])
  with pytest.raises(mad_archive.ArchiveError, match="volume"):
    mad_archive.check(archive)
  open(vols[-1], "wb").write(last)
  mad_archive.check(archive)
  mad_archive.pack(str(tmp_path / "b"), archive, 2**24, log=lambda s: None, parts=2)
  assert mad_archive.volumes(archive) == [archive] and not os.path.exists(vols[1])


def test_archive_check_refuses_what_pack_did_not_write(tmp_path):
  junk = tmp_path / "junk.tar.gz"
  junk.write_bytes(b"not an archive")
  with pytest.raises(mad_archive.ArchiveError, match="not a readable .tar.gz"):
    mad_archive.check(str(junk))
  import tarfile
  stray = tmp_path / "stray.tar.gz"
  (tmp_path / "x.txt").write_text("x")
  with tarfile.open(stray, "w:gz") as tar:
    tar.add(tmp_path / "x.txt", arcname="../x.txt")
  with pytest.raises(mad_archive.ArchiveError, match="not part of a MAD workdir"):
    mad_archive.check(str(stray))
  proc = _cli(f"--workdir={tmp_path / 'w'}", f"--unpack={junk}")
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --unpack: ")
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "w").exists()


def test_cli_parallel_budget_pack_unpack(tmp_path):
  """--budget_s spent before any epoch: nothing trained, both items listed unfinished; the
  serial rerun trains them; --parallel 2 in another workdir gives the same results and table;
  its --pack archive unpacked into a fresh workdir is read back without training; a failing
  item is reported while the others go on."""
  base = ["--smoke", "--tasks=in_context_recall", "--layouts=MHA,Hyena-SE"]
  read = lambda d: json.load(open(d / "results.json"))
  stopped = _cli(*base, f"--workdir={tmp_path / 's'}", "--parallel=2", "--budget_s=0.001")
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  assert " epoch 1/" not in stopped.stdout and "skipped" in stopped.stdout
  assert [u["layout"] for u in read(tmp_path / "s")["unfinished"]] == ["MHA", "Hyena-SE"]
  serial = _cli(*base, f"--workdir={tmp_path / 's'}")
  assert serial.returncode == 0, serial.stderr[-3000:]
  assert read(tmp_path / "s")["unfinished"] == []
  parallel = _cli(*base, f"--workdir={tmp_path / 'p'}", "--parallel=2",
                  f"--pack={tmp_path / 'p.tar.gz'}")
  assert parallel.returncode == 0, parallel.stderr[-3000:]
  assert "[w0]" in parallel.stdout and "[w1]" in parallel.stdout
  s, p = read(tmp_path / "s"), read(tmp_path / "p")
  assert (p["results"], p["table"], p["config"]) == (s["results"], s["table"], s["config"])
  assert "pack: " in parallel.stdout and (tmp_path / "p.tar.gz").stat().st_size < 2**20
  again = _cli(*base, f"--workdir={tmp_path / 'u'}", f"--unpack={tmp_path / 'p.tar.gz'}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert " epoch 1/" not in again.stdout and "unpack: 2 of 2 items restored" in again.stdout
  u = read(tmp_path / "u")
  assert (u["results"], u["table"]) == (s["results"], s["table"])
  # an item that raises in its worker (its directory holds another configuration's run) is
  # reported and the other item still trains; results.json is written; exit code 1
  mixed = _cli(*base, f"--workdir={tmp_path / 'p'}", "--layouts=MHA,Hyena-LI", "--lrs=0.01",
               "--parallel=2")
  assert mixed.returncode == 1, mixed.stderr[-3000:]
  assert "error: 1 items failed: in_context_recall baseline MHA" in mixed.stderr
  assert "another configuration" in mixed.stdout
  assert read(tmp_path / "p")["results"]["in_context_recall"]["baseline"]["Hyena-LI"]["complete"]
