"""Runs pytorch-metric-learning's own test files for the classes that `metricloss_kernels.pml` replaces, twice: as
they are (PML's classes) and with PML's classes replaced by `metricloss_kernels.pml`'s (the same names set in PML's
modules before the tests import them), and prints each test's outcome side by side with the pass counts.

No PML code lives in this repository: the test files are taken from a PML git repository (--source, a clone or a
bare mirror; --rev defaults to the tag of the installed PML version, else HEAD) or cloned from GitHub at that tag.

    python tools/run_pml_tests.py                                          # git clone of v<installed version>
    python tools/run_pml_tests.py --source ~/src/pytorch-metric-learning   # an existing clone
    python tools/run_pml_tests.py --source DIR --dtypes float32,float64 --keep /tmp/pml_tests

Exit status 1 when a test that passes for PML does not pass with metricloss_kernels.pml.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
URL = "https://github.com/KevinMusgrave/pytorch-metric-learning"

# PML's test files that construct one of the replaced classes (paths inside PML's tests/). PML's other files
# using them need torchvision and datasets (tests/trainers).
TEST_FILES = [
    "losses/test_proxy_anchor_loss.py", "losses/test_proxy_nca_loss.py", "losses/test_soft_triple_loss.py",
    "losses/test_arcface_loss.py", "losses/test_subcenter_arcface_loss.py", "losses/test_cosface_loss.py",
    "losses/test_normalized_softmax_loss.py", "losses/test_losses_without_labels.py",
    "regularizers/test_center_invariant_regularizer.py", "regularizers/test_regular_face_regularizer.py",
    "utils/test_calculate_accuracies.py", "utils/test_calculate_accuracies_large_k.py",
    "testers/test_global_embedding_space_tester.py", "testers/test_global_two_stream_embedding_space_tester.py",
    "testers/test_with_same_parent_label_tester.py",
]

# A pytest plugin (-p) imported before collection: PML's modules then hand out metricloss_kernels.pml's classes.
# It also counts the calls of the classes' functional losses (the accelerated path) into ACCELERATED_CALLS.
SWAP_PLUGIN = '''\
import collections
import functools
import json
import os

import metricloss_kernels.pml as ours
from pytorch_metric_learning import losses
from pytorch_metric_learning.utils import accuracy_calculator

for name in ours.__all__:
    if hasattr(losses, name):
        setattr(losses, name, getattr(ours, name))
accuracy_calculator.AccuracyCalculator = ours.AccuracyCalculator

CALLS = collections.Counter()


def _counted(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        CALLS[fn.__name__] += 1
        return fn(*args, **kwargs)
    return staticmethod(wrapper)


for cls in vars(ours).values():
    if isinstance(cls, type) and "_functional" in vars(cls):
        cls._functional = _counted(cls._functional)


def pytest_sessionfinish(session):
    with open(os.environ["ACCELERATED_CALLS"], "w") as f:
        json.dump(CALLS, f)
'''


def _git(*args, **kwargs):
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True, **kwargs).stdout


def fetch_tests(source, rev, version, dest):
    """Extracts PML's tests/ at `rev` (default: tag v<version>, else HEAD) into dest; returns the revision used."""
    if source is None:
        source = os.path.join(dest, "clone")
        try:
            _git("clone", "--quiet", "--depth", "1", "--branch", rev or f"v{version}", URL, source)
        except subprocess.CalledProcessError:  # no such tag: the default branch
            if rev:
                raise
            _git("clone", "--quiet", "--depth", "1", URL, source)
        rev = "HEAD"
    if rev is None:
        tags = _git("-C", source, "tag", "--list", f"v{version}").split()
        rev = tags[0] if tags else "HEAD"
    archive = subprocess.run(["git", "-C", source, "archive", rev, "tests"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return f"{rev} ({_git('-C', source, 'rev-parse', rev).strip()[:12]})"


def run_pytest(dest, files, env, swap):
    """{test id: "passed" | "failed" | "skipped"} from one pytest run in dest."""
    report = os.path.join(dest, f"report_{'ours' if swap else 'pml'}.xml")
    paths = [os.environ.get("PYTHONPATH", ""), ROOT] + ([dest] if swap else [])
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
           f"--junitxml={report}", *(["-p", "_mlk_swap"] if swap else []), *[f"tests/{f}" for f in files]]
    calls = os.path.join(dest, "accelerated_calls.json")
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "ACCELERATED_CALLS": calls})
    if not os.path.exists(report):
        sys.exit(f"pytest did not run ({'ours' if swap else 'PML'}):\n{proc.stdout}\n{proc.stderr}")
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        outcomes[test_id] = ("failed" if kinds & {"failure", "error"} else
                             "skipped" if "skipped" in kinds else "passed")
    return outcomes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", help="a PML git repository (clone or bare); default: clone from GitHub")
    parser.add_argument("--rev", help="revision of --source (default: tag v<installed PML version>, else HEAD)")
    parser.add_argument("--device", default="cpu", help="PML's TEST_DEVICE (default cpu)")
    parser.add_argument("--dtypes", default="float16,float32,float64", help="PML's TEST_DTYPES")
    parser.add_argument("--keep", help="extract the tests into this (empty) directory and keep them")
    args = parser.parse_args()

    import pytorch_metric_learning
    version = pytorch_metric_learning.__version__
    dest = args.keep or tempfile.mkdtemp(prefix="pml_tests_")
    os.makedirs(dest, exist_ok=True)
    revision = fetch_tests(args.source, args.rev, version, dest)
    with open(os.path.join(dest, "_mlk_swap.py"), "w") as f:
        f.write(SWAP_PLUGIN)
    env = {**os.environ, "TEST_DEVICE": args.device, "TEST_DTYPES": args.dtypes, "WITH_COLLECT_STATS": "false"}
    files = [f for f in TEST_FILES if os.path.exists(os.path.join(dest, "tests", f))]
    print(f"pytorch-metric-learning {version} installed; its tests at {revision}; "
          f"TEST_DEVICE={args.device} TEST_DTYPES={args.dtypes}; {len(files)} files in {dest}")

    pml, ours = run_pytest(dest, files, env, swap=False), run_pytest(dest, files, env, swap=True)
    width = max(map(len, pml | ours))
    print(f"{'test':{width}}  {'PML':8}  metricloss_kernels.pml")
    for test_id in sorted(pml | ours):
        print(f"{test_id:{width}}  {pml.get(test_id, '-'):8}  {ours.get(test_id, '-')}")
    for name, outcomes in (("PML", pml), ("metricloss_kernels.pml", ours)):
        counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")}
        print(f"{name}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped "
              f"of {len(outcomes)}")
    with open(os.path.join(dest, "accelerated_calls.json")) as f:
        print("calls of metricloss_kernels.functional (the accelerated path) in those tests:", json.load(f))
    regressions = sorted(t for t, v in pml.items() if v == "passed" and ours.get(t) != "passed")
    if regressions:
        print("passing for PML but not with metricloss_kernels.pml:", *regressions, sep="\n  ")
    sys.exit(1 if regressions else 0)


if __name__ == "__main__":
    main()
