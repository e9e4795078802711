"""Two training workers on two Ray nodes; one node is removed mid-run and the run recovers.

It needs a cluster of several nodes (`ray.cluster_utils.Cluster`), so it runs in its own Python
process and never touches the test session's Ray cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mttl.data.synthetic import prepare_synthetic

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys, threading
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster
    from ray._private import ray_constants

    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from mttl.train.loop import pretrain
    from train_support import tiny_config, train_worker_pids, wait_for_registered_checkpoint

    data_dir, out = Path(sys.argv[3]), Path(sys.argv[4])
    # one training slot per node: the two workers must sit on two different nodes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"slot": 1}})
    nodes = [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(2)]
    cluster.wait_for_nodes()
    cfg = tiny_config(data_dir, out, "multinode", ray_address=cluster.address, total_steps=120, save_every=10,
                      eval_every=None, log_every=5, max_failures=2,
                      resources_per_worker={"CPU": 0.5, "slot": 1})
    run_dir = out / "multinode"
    errors = []
    def run():
        try:
            pretrain(cfg)
        except BaseException as err:
            errors.append(repr(err))
    thread = threading.Thread(target=run)
    thread.start()
    killed_at = wait_for_registered_checkpoint(run_dir)
    def raylet_pid(node):
        return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    hosting = [n for n in [cluster.head_node, *nodes] if train_worker_pids(raylet_pid(n))]
    worker_nodes = len(hosting)
    victim = next(n for n in nodes if n in hosting)
    cluster.remove_node(victim)
    # recovery takes 1-2 min here; the margin is for loaded machines (a run that never ends shows
    # up as alive=True, as when restarted workers waited on data blocks lost with the node)
    thread.join(timeout=800)
    (out / "report.json").write_text(json.dumps({"errors": errors, "alive": thread.is_alive(),
                                                 "killed_at": killed_at, "worker_nodes": worker_nodes}))
    ray.shutdown()
    cluster.shutdown()
""")


def test_run_recovers_when_a_node_is_removed(tmp_path):
    prepare_synthetic(tmp_path / "synthetic", seed=0)
    script = tmp_path / "multinode.py"
    script.write_text(SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(REPO), str(TESTS), str(tmp_path / "synthetic"),
                           str(tmp_path / "runs")], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert report["errors"] == [] and not report["alive"], report
    assert report["worker_nodes"] == 2
    run_dir = tmp_path / "runs" / "multinode"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    resumed = [r["resumed_from_step"] for r in rows if "resumed_from_step" in r]
    assert resumed and resumed[0] >= report["killed_at"]
    final_state = max(json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/trainer_state.json"))
    assert final_state == 120
    assert (run_dir / "final" / "adapters.safetensors").is_file()


LOST_BLOCKS_SCRIPT = textwrap.dedent("""
    import json, sys

    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    sys.path[:0] = [sys.argv[1]]
    from mttl.data.stream import DatasetPerAttempt

    # no CPU on the head: every block is computed on, and stored by, one of the two other nodes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)

    def build():  # 16 blocks of 256 KiB: over Ray's 100 KiB in-memory limit, so they sit in node stores
        return ray.data.range_tensor(4000, shape=(128,), override_num_blocks=16).materialize()

    original = build()
    per_attempt = DatasetPerAttempt(original, build)
    first_block = next(iter(original.iter_internal_ref_bundles())).block_refs[0]
    holder = ray.experimental.get_object_locations([first_block])[first_block]["node_ids"]
    report = {"first_is_original": per_attempt() is original and per_attempt() is original, "holder": holder}
    cluster.remove_node(next(node for node in nodes if node.node_id in holder))
    cluster.wait_for_nodes()
    after = per_attempt()
    report.update(rebuilds=per_attempt.rebuilds, rebuilt=after is not original, again_same=per_attempt() is after,
                  rows=sorted(int(row["data"][0]) for row in after.iter_rows()))
    print(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
""")


def test_blocks_lost_with_a_node_are_built_again(tmp_path):
    script = tmp_path / "lost_blocks.py"
    script.write_text(LOST_BLOCKS_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(REPO)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["first_is_original"] and len(report["holder"]) == 1
    assert report["rebuilt"] and report["rebuilds"] == 1 and report["again_same"]
    assert report["rows"] == list(range(4000))
