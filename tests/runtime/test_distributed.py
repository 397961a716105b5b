"""runtime.distributed: device strings, the process-group timeout, rank 0's resume decision
(also across per-node run folders, two gloo processes), all-reduce of device sums."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
from helpers import as_rank, free_port

from featdenoise.hub import checkpoints as ckpt
from featdenoise.runtime import distributed as dist
from featdenoise.training import loop, resume
from featdenoise.training.recipes import pgd

# ---------------------------------------------------------------------------------------------
# Device strings


def test_bogus_device_is_one_value_error_naming_it():
    with pytest.raises(ValueError, match="'bogus'") as err:
        dist.resolve_device("bogus", what="--device")
    assert str(err.value).startswith("--device") and "\n" not in str(err.value)
    for bad in ("cpu:0", "cuda:x", "gpu", ""):
        with pytest.raises(ValueError, match="not a device"):
            dist.resolve_device(bad)


def test_cuda_without_gpu_names_the_option_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as err:
        dist.init("cuda", what="--device")
    msg = str(err.value)
    assert msg.startswith("--device 'cuda'") and "run.device" not in msg and "use cpu" in msg
    assert dist.resolve_device("auto") == torch.device("cpu")


def _fake_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_cuda_under_torchrun_takes_local_rank_and_explicit_index_is_refused(monkeypatch):
    _fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert dist.resolve_device("cuda") == torch.device("cuda", 2)
    assert dist.resolve_device("auto") == torch.device("cuda", 2)
    with pytest.raises(ValueError, match="all 4 processes of this node on one GPU"):
        dist.resolve_device("cuda:1", what="run.device")
    # One process per node: an explicit GPU is fine.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert dist.resolve_device("cuda:3") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="GPU 7 does not exist"):
        dist.resolve_device("cuda:7")


# ---------------------------------------------------------------------------------------------
# Timeout


def test_timeout_from_argument_env_or_default(monkeypatch):
    monkeypatch.delenv(dist.TIMEOUT_ENV, raising=False)
    assert dist.timeout_seconds() == dist.DEFAULT_TIMEOUT_S >= 3600
    monkeypatch.setenv(dist.TIMEOUT_ENV, "90")
    assert dist.timeout_seconds() == 90.0
    assert dist.timeout_seconds(5) == 5.0
    monkeypatch.setenv(dist.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="FEATDENOISE_DIST_TIMEOUT='soon'"):
        dist.timeout_seconds()
    with pytest.raises(ValueError, match="> 0"):
        dist.timeout_seconds(0)


def test_init_passes_the_timeout_to_the_process_group(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(dist.TIMEOUT_ENV, "123")
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda **kw: seen.update(kw))
    assert dist.init("cpu") == torch.device("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=123)


# ---------------------------------------------------------------------------------------------
# Helpers on one process


def test_all_reduce_sum_accepts_device_sums_and_numbers():
    assert dist.all_reduce_sum([torch.tensor(2.5), torch.tensor(3), 4, 0.5]) == [2.5, 3.0, 4.0,
                                                                                  0.5]
    assert dist.all_reduce_sum(torch.tensor([1, 2])) == [1.0, 2.0]


def test_decide_on_main_and_share_file_on_one_process(tmp_path):
    assert dist.decide_on_main(lambda: 7) == 7
    with pytest.raises(FileNotFoundError):
        dist.decide_on_main(lambda: open(tmp_path / "missing"))
    assert dist.share_file(str(tmp_path / "anything")) == 0


def _cfg(out_dir, resume="auto"):
    return loop.load_config(None, [f"run.out_dir={out_dir}", f"run.resume={resume}"])


def test_resume_decision(tmp_path):
    assert resume.resume_decision(_cfg(tmp_path)) is None
    path = tmp_path / ckpt.CHECKPOINT
    path.write_bytes(b"x")
    assert resume.resume_decision(_cfg(tmp_path)) == str(path)
    assert resume.resume_decision(_cfg(tmp_path, "never")) is None
    assert resume.resume_decision(_cfg(tmp_path / "other", str(path))) == str(path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        resume.resume_decision(_cfg(tmp_path, str(tmp_path / "nope.pt")))


# ---------------------------------------------------------------------------------------------
# Two gloo processes, one run folder each: only rank 0's holds a checkpoint


def _resume_worker(rank, world, port, folders, missing):
    as_rank(rank, world, port)
    # Each "node" works in its own folder: the same relative run.out_dir names different disks.
    os.chdir(folders[rank])
    dist.init("cpu")
    try:
        path = resume.resume_path(_cfg("run"))
        saved = ckpt.load_checkpoint(path)
        torch.save({"path": path, "step": saved["step"], "weight": saved["model"]["w"]},
                   "seen.pt")
        # A missing explicit checkpoint on rank 0 stops every rank with the same error.
        try:
            dist.decide_on_main(lambda: resume.resume_decision(_cfg("run", missing)))
        except FileNotFoundError as err:
            open("error.txt", "w").write(str(err))
    finally:
        dist.shutdown()


def test_two_processes_resume_from_rank0s_checkpoint_with_per_rank_folders(tmp_path):
    import torch.multiprocessing as mp

    folders = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    os.makedirs(folders[1])
    cwd = os.getcwd()
    model = torch.nn.Module()
    model.register_parameter("w", torch.nn.Parameter(torch.arange(4.0)))
    ckpt.save_checkpoint(os.path.join(folders[0], "run", ckpt.CHECKPOINT), model=model,
                         model_name="m", model_kwargs={}, optimizer=torch.optim.SGD(
                             model.parameters(), lr=0.1), position=ckpt.Position(
                             epoch=2, step_in_epoch=3, step=17, schedule_step=17), config={})
    try:
        mp.start_processes(_resume_worker, args=(2, free_port(), folders,
                                                 str(tmp_path / "absent.pt")),
                           nprocs=2, join=True, start_method="fork")
    finally:
        os.chdir(cwd)
    seen = [torch.load(os.path.join(f, "seen.pt"), weights_only=True) for f in folders]
    # Both resume at step 17 with rank 0's weights; rank 1's folder received the same bytes.
    assert [s["step"] for s in seen] == [17, 17]
    assert all(torch.equal(s["weight"], torch.arange(4.0)) for s in seen)
    assert seen[0]["path"] == seen[1]["path"] == os.path.join("run", ckpt.CHECKPOINT)
    copy = os.path.join(folders[1], "run", ckpt.CHECKPOINT)
    assert dist.file_digest(copy) == dist.file_digest(os.path.join(folders[0], "run",
                                                                   ckpt.CHECKPOINT))
    errors = [open(os.path.join(f, "error.txt")).read() for f in folders]
    assert errors[0] == errors[1] and "absent.pt" in errors[0]


def _share_worker(rank, world, port, folders, shared):
    as_rank(rank, world, port)
    dist.init("cpu")
    try:
        os.chdir(folders[rank])
        local = dist.share_file("f.bin")  # a stale copy on rank 1's "disk"
        os.chdir(shared)
        common = dist.share_file("f.bin")  # one file seen by both: nothing to send
        with open(os.path.join(folders[rank], "n.txt"), "w") as f:
            f.write(f"{local} {common}")
    finally:
        dist.shutdown()


def test_share_file_replaces_a_stale_copy_and_leaves_a_shared_one(tmp_path):
    import torch.multiprocessing as mp

    folders = [str(tmp_path / "a"), str(tmp_path / "b")]
    for f, data in zip(folders, (b"new checkpoint", b"old checkpoint"), strict=True):
        os.makedirs(f)
        with open(os.path.join(f, "f.bin"), "wb") as out:
            out.write(data)
    (tmp_path / "f.bin").write_bytes(b"shared")
    cwd = os.getcwd()
    try:
        mp.start_processes(_share_worker, args=(2, free_port(), folders, str(tmp_path)),
                           nprocs=2, join=True, start_method="fork")
    finally:
        os.chdir(cwd)
    assert [open(os.path.join(f, "n.txt")).read() for f in folders] == ["1 0", "1 0"]
    assert open(os.path.join(folders[1], "f.bin"), "rb").read() == b"new checkpoint"


def _train_config(data, *extra):
    return loop.load_config(None, [
        "model.name=small_resnet", "model.kwargs={in_channels: 1, width: 4, blocks: [1, 1, 1]}",
        "data.name=fashion_mnist", f"data.root={data}", "data.batch_size=8", "data.workers=0",
        "data.augment=false", "attack.steps=1", "attack.eps=16", "attack.step_size=4",
        "optim.epochs=2", "optim.milestones=[]", "optim.base_batch=8", "run.out_dir=run",
        "run.eval_every=0", "run.final_eval_steps=0", "run.log_every=2",
        "run.checkpoint_every=0", "run.progress=false", "run.tensorboard=false", "run.device=cpu",
        *extra])


def _train_worker(rank, world, port, folders, cfg_dict):
    as_rank(rank, world, port)
    os.chdir(folders[rank])
    from featdenoise.training.config import from_dict

    real_step, first = pgd.train_step, []

    def spy(model, *args, **kw):
        state = args[3]
        if not first:
            first.append(state.step)
        out = real_step(model, *args, **kw)
        params = dict(dist.unwrap(model).named_parameters())  # BN buffers: each rank's last batch
        torch.save({"first": first[0], "weights": params}, "final.pt")
        return out

    pgd.train_step = spy
    loop.train(from_dict(cfg_dict))


def test_two_processes_train_on_from_rank0s_checkpoint_with_per_rank_folders(tmp_path):
    import torch.multiprocessing as mp
    from helpers import write_random_fashion_mnist

    data = tmp_path / "fmnist"
    data.mkdir()
    write_random_fashion_mnist(data, 48, 8)
    folders = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    for f in folders:
        os.makedirs(f)
    cwd = os.getcwd()
    try:
        # Node 0 alone trains one epoch (6 steps) and stops; node 1's folder stays empty.
        os.chdir(folders[0])
        loop.train(_train_config(data, "run.stop_after=6"))
        assert ckpt.load_checkpoint(os.path.join("run", ckpt.CHECKPOINT))["step"] == 6
        os.chdir(cwd)
        mp.start_processes(_train_worker, args=(2, free_port(), folders,
                                                _train_config(data).to_dict()),
                           nprocs=2, join=True, start_method="fork")
    finally:
        os.chdir(cwd)
    runs = [torch.load(os.path.join(f, "final.pt"), weights_only=True) for f in folders]
    assert [r["first"] for r in runs] == [6, 6]  # both resumed at rank 0's step
    # Rank 1's folder received rank 0's step-6 checkpoint; rank 0 alone wrote on (step 9).
    saved = [ckpt.load_checkpoint(os.path.join(f, "run", ckpt.CHECKPOINT))["step"]
             for f in folders]
    assert saved == [9, 6]
    for k, v in runs[0]["weights"].items():
        assert torch.equal(v, runs[1]["weights"][k]), k


# ---------------------------------------------------------------------------------------------
# Ablation under torchrun: one process group, rank-aware evaluation, one writer


def _ablate_worker(rank, world, port, config, out_dir):
    as_rank(rank, world, port)
    import json

    import featdenoise.evaluation.whitebox as wb
    from featdenoise.analysis import ablate

    real, ranks = wb.evaluate_whitebox, []

    def spy(*args, **kw):  # who evaluates, as which rank, in which group
        ranks.append((dist.rank(), dist.world_size()))
        return real(*args, **kw)

    wb.evaluate_whitebox = spy
    out = ablate.run_ablation(config, out_dir, variants=["baseline"], steps=[1],
                              evaluation=ablate.EvalSettings(limit=8, batch_size=2),
                              progress=False)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"ranks": ranks, "table": out["table"], "group_left": not dist.is_dist(),
                   "n": out["results"][0]["num_images"]}, f)


def test_ablate_under_two_processes_evaluates_by_rank_and_writes_once(tmp_path):
    import json

    import torch.multiprocessing as mp
    import yaml
    from helpers import write_random_fashion_mnist

    data = tmp_path / "fmnist"
    data.mkdir()
    write_random_fashion_mnist(data, 32, 8)
    cfg = _train_config(data, "optim.epochs=1", "attack.steps=0").to_dict()
    cfg["model"]["kwargs"] = {"in_channels": 1, "width": 4, "blocks": [1, 1, 1]}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "abl"
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)  # the config's relative run.out_dir is replaced per variant anyway
        mp.start_processes(_ablate_worker, args=(2, free_port(), str(path), str(out)),
                           nprocs=2, join=True, start_method="fork")
    finally:
        os.chdir(cwd)
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Both processes evaluated as themselves in a world of 2 (the group outlived train()),
    # both return rank 0's table, the group was left at the end.
    assert [s["ranks"] for s in seen] == [[[0, 2]], [[1, 2]]]
    assert seen[0]["table"] == seen[1]["table"] == str(out / "ablation.md")
    assert all(s["group_left"] and s["n"] == 8 for s in seen)
    parts = sorted(p.name for p in (out / "eval" / "baseline-seed0" / "parts").iterdir())
    assert parts == ["outcomes-rank0.jsonl", "outcomes-rank1.jsonl"]
    by_rank = [{json.loads(line)["index"] for line in p.read_text().splitlines() if line.strip()}
               for p in sorted((out / "eval" / "baseline-seed0" / "parts").iterdir())]
    assert not by_rank[0] & by_rank[1] and len(by_rank[0] | by_rank[1]) == 8  # each image once
