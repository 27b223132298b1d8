"""Run timm's own model tests (tests/test_models.py of the installed timm version) on
effkern-patched ViTs, beside an unpatched control run, and print the pass counts.

    pip download --no-deps --no-binary :all: timm==$(python -c "import timm; print(timm.__version__)") -d /tmp/timmsdist
    tar xzf /tmp/timmsdist/timm-*.tar.gz -C /tmp/timmsdist
    nice -n 15 python benchmarks/timm_model_tests.py --timm-tests /tmp/timmsdist/timm-<version>/tests

The timm sdist carries its tests.  This script copies test_models.py (and its
conftest.py) into a scratch directory, so the INSTALLED timm is the one tested, and
runs pytest twice, side by side, on the same selection (ViT-family models, CPU): ``control`` (timm
as is) and ``patched`` (this file is also the pytest plugin: it wraps
timm.create_model so that every VisionTransformer it returns goes through
effkern.timm.patch; models patch() rejects stay unpatched and are counted).  Output:
per test function, passed / failed / skipped for both runs, and the failures of the
patched run that the control does not have.  Not part of CI (minutes to hours of CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from pathlib import Path

MODE_ENV = "EFFKERN_TIMM_TESTS_MODE"
STATS_ENV = "EFFKERN_TIMM_TESTS_STATS"

# small members of the ViT-family variants the issue names (timm's tests build them at
# their default size): plain, register token + avg pool + fc_norm, DeiT, distilled DeiT,
# hybrid, SigLIP (map pool), and one that patch() rejects (parallel blocks)
DEFAULT_MODELS = [
    "vit_tiny_patch16_224", "vit_wee_patch16_reg1_gap_256", "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224", "vit_tiny_r_s16_p8_224", "vit_base_patch16_siglip_224",
    "vit_small_patch16_18x2_224",
]
MARKERS = "base or forward or backward or torchscript or features or fxforward or fxbackward or cfg"


# ------------------------------------------------------------------ pytest plugin side

_STATS: Counter = Counter()


def pytest_configure(config):  # noqa: D401 - pytest hook
    if os.environ.get(MODE_ENV) != "patched":
        return
    import timm
    import timm.models
    import timm.models._factory as factory
    from timm.models.vision_transformer import VisionTransformer

    import effkern.timm

    original = factory.create_model

    def create_model(*args, **kwargs):
        model = original(*args, **kwargs)
        if isinstance(model, VisionTransformer):
            try:
                effkern.timm.patch(model)
                _STATS["patched"] += 1
            except ValueError:
                _STATS["rejected"] += 1
        return model

    timm.create_model = timm.models.create_model = factory.create_model = create_model


def pytest_sessionfinish(session, exitstatus):  # noqa: D401 - pytest hook
    path = os.environ.get(STATS_ENV)
    if path and os.environ.get(MODE_ENV) == "patched":
        Path(path).write_text(json.dumps(dict(_STATS)))


# ------------------------------------------------------------------ driver side

def _results(xml_path: Path) -> dict:
    """junit xml -> {test id: 'passed' | 'failed' | 'skipped'}."""
    out = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped"
        out[case.get("name")] = status
    return out


def _start(mode: str, work: Path, models, markers: str):
    """Start one pytest run (control and patched run side by side)."""
    xml, stats = work / f"{mode}.xml", work / f"{mode}_stats.json"
    env = dict(os.environ, **{MODE_ENV: mode, STATS_ENV: str(stats)})
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-p", "timm_model_tests",
           str(work / "test_models.py"), "-m", markers, "-k", " or ".join(models),
           f"--junitxml={xml}", "-o", "junit_family=xunit2"]
    print(f"[{mode}] {' '.join(cmd)}\n  log: {work / (mode + '.log')}", flush=True)
    log = open(work / f"{mode}.log", "w")  # pytest's own output (-v: one line per test, as it runs)
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT), xml, stats


def _finish(run, timeout: int) -> tuple[dict, dict]:
    proc, xml, stats = run
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
    results = _results(xml) if xml.exists() else {}
    return results, (json.loads(stats.read_text()) if stats.exists() else {})


def _summary(results: dict) -> dict:
    by_fn = defaultdict(Counter)
    for name, status in results.items():
        by_fn[name.split("[")[0]][status] += 1
    return by_fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--timm-tests", required=True, type=Path, help="tests/ directory of the timm sdist")
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated timm model names")
    ap.add_argument("--markers", default=MARKERS, help="pytest -m expression over timm's markers")
    ap.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per run")
    ap.add_argument("--out", type=Path, help="write the JSON summary here")
    args = ap.parse_args(argv)
    src = args.timm_tests / "test_models.py"
    if not src.is_file():
        ap.error(f"--timm-tests: no test_models.py in {args.timm_tests}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    work = Path(tempfile.mkdtemp(prefix="effkern_timm_tests_"))
    shutil.copy(src, work / "test_models.py")
    if (args.timm_tests / "conftest.py").is_file():
        shutil.copy(args.timm_tests / "conftest.py", work / "conftest.py")
    markers = "\n".join(f"    {m.strip()}: timm marker" for m in
                        "base forward backward cfg cfg_nonstd torchscript features fxforward fxbackward".split())
    (work / "pytest.ini").write_text(f"[pytest]\nmarkers =\n{markers}\n")

    import timm

    runs = {mode: _start(mode, work, models, args.markers) for mode in ("control", "patched")}
    control, _ = _finish(runs["control"], args.timeout)
    patched, stats = _finish(runs["patched"], args.timeout)
    summary = {"timm": timm.__version__, "models": models, "markers": args.markers,
               "create_model calls": stats, "functions": {}}
    print(f"\ntimm {timm.__version__}, {len(models)} models, markers: {args.markers}")
    print(f"patched run: {stats.get('patched', 0)} VisionTransformers patched, "
          f"{stats.get('rejected', 0)} rejected by patch()")
    print(f"{'test function':45s} {'control pass/fail/skip':>24s} {'patched pass/fail/skip':>24s}")
    c_sum, p_sum = _summary(control), _summary(patched)
    for fn in sorted(set(c_sum) | set(p_sum)):
        c, p = c_sum.get(fn, Counter()), p_sum.get(fn, Counter())
        cs, ps = f"{c['passed']}/{c['failed']}/{c['skipped']}", f"{p['passed']}/{p['failed']}/{p['skipped']}"
        print(f"{fn:45s} {cs:>24s} {ps:>24s}")
        summary["functions"][fn] = {"control": dict(c), "patched": dict(p)}
    regressions = sorted(n for n, s in patched.items() if s == "failed" and control.get(n) != "failed")
    summary["patched_only_failures"] = regressions
    print(f"failures in the patched run only: {len(regressions)}")
    for name in regressions:
        print(f"  {name}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
