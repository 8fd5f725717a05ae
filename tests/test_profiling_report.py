"""The latest-results table: newest result per (device, config), GPU only by default, parity status,
README block rewritten between its markers."""
import json

import pytest

from flashdino.profiling.report import BEGIN, END, latest_table, main, update_readme


def _bench(path, device, label, date, engine_ips, ref_ips, device_type="cuda", mem=20480.0):
    report = {
        "kind": "flashdino.bench",
        "meta": {"device": {"name": device, "type": device_type}, "date": date, "git": {"commit": "0123456789ab", "dirty": False}},
        "config": {"label": label},
        "workload": {"method": "simdino", "arch": "vit_base", "batch_size": 128, "precision": "bf16", "data": "synthetic"},
        "peak": {"mfu_basis": "datasheet dense peak"},
        "sides": {"engine": {"images_per_s": engine_ips, "mfu": 0.5, "peak_mem_mib": {"allocated": mem}},
                  "reference": {"images_per_s": ref_ips, "mfu": 0.25, "peak_mem_mib": {"allocated": 2 * mem}}},
        "speedup": engine_ips / ref_ips,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))


def _parity(path, device, label, ok):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": "flashdino.parity", "meta": {"device": {"name": device, "type": "cuda"},
                                                                     "date": "2026-01-01T00:00:00+00:00"},
                                "config": {"label": label}, "ok": ok, "first_failure_step": None if ok else 3}))


def test_latest_table(tmp_path):
    _bench(tmp_path / "a" / "bench.json", "NVIDIA H100", "simdino_vitb16-bf16-1", "2026-01-01T00:00:00+00:00", 1000.0, 500.0)
    _bench(tmp_path / "b" / "bench.json", "NVIDIA H100", "simdino_vitb16-bf16-1", "2026-02-01T00:00:00+00:00", 1234.5, 617.25)
    _bench(tmp_path / "c" / "bench.json", "NVIDIA H100", "dino_vits16-bf16-2", "2026-01-15T00:00:00+00:00", 3000.0, 1000.0)
    _bench(tmp_path / "d" / "bench.json", "CPU (x86_64)", "demo-fp32-3", "2026-03-01T00:00:00+00:00", 2.0, 1.0, "cpu")
    _parity(tmp_path / "p" / "parity.json", "NVIDIA H100", "dino_vits16-bf16-2", ok=False)
    (tmp_path / "junk.json").write_text("{not json")
    table = latest_table(str(tmp_path))
    rows = [line for line in table.splitlines() if line.startswith("| NVIDIA")]
    assert len(rows) == 2  # newest per (device, label); the CPU run is left out
    dino, simdino = rows  # sorted by label
    assert "| 1234.5 | 617.2 | 2.00x | 50.0% | 25.0% | 20.00 | 40.00 | - |" in simdino
    assert "1000.0 | 500.0" not in table
    assert "3.00x" in dino and "FAIL (step 3)" in dino
    assert "demo-fp32-3" in latest_table(str(tmp_path), include_cpu=True)


def test_table_gives_both_mfu_bases_when_the_run_measured_its_ceiling(tmp_path):
    path = tmp_path / "a" / "bench.json"
    _bench(path, "NVIDIA H100", "simdino_vitb16-bf16-1", "2026-01-01T00:00:00+00:00", 830.0, 332.0)
    report = json.loads(path.read_text())
    report["sides"]["engine"].update(mfu_datasheet=0.396, mfu_measured=0.491)
    path.write_text(json.dumps(report))
    row = next(line for line in latest_table(str(tmp_path)).splitlines() if line.startswith("| NVIDIA"))
    assert "| 39.6% / 49.1% | 25.0% |" in row  # the reference, an older record, has one figure


def test_no_results_says_how_to_make_them(tmp_path):
    assert "No bench results" in latest_table(str(tmp_path))


def test_update_readme_between_markers(tmp_path):
    _bench(tmp_path / "r" / "bench.json", "NVIDIA H100", "x-bf16-1", "2026-01-01T00:00:00+00:00", 10.0, 5.0)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nintro\n{BEGIN}\nold table\n{END}\n\nmore text\n")
    assert main(["--results", str(tmp_path / "r"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and "| NVIDIA H100 | x-bf16-1 |" in text
    assert text.startswith("# title\n\nintro\n") and text.endswith(f"{END}\n\nmore text\n")
    assert update_readme(str(readme), latest_table(str(tmp_path / "r"))) is False  # idempotent
    bare = tmp_path / "BARE.md"
    bare.write_text("no markers\n")
    with pytest.raises(ValueError, match="no results block"):
        update_readme(str(bare), "table")
    assert main(["--results", str(tmp_path), "--readme", str(bare)]) == 2


def test_suite_commands_parse_with_the_cli():
    from flashdino.engine.cli import build_parser
    from flashdino.profiling.suite import FAST_PATHS, commands

    runs = commands(["simdino_vitb16", "dinov2_vitb16"], FAST_PATHS.split(), ["train.seed=1"], skip=["profile"])
    assert [r[0] for r in runs] == ["parity", "bench", "parity", "bench", "bench"] and runs[-1][1:] == ["--kernels", "all"]
    parser = build_parser()
    for run in runs:
        args = parser.parse_args(run)
        if run[0] == "parity" or "--kernels" not in run:
            assert args.preset in ("simdino_vitb16", "dinov2_vitb16")
            assert "runtime.compile=block" in args.overrides and args.overrides[-1] == "train.seed=1"


def test_bad_cli_numbers_exit_2_before_any_work():
    from flashdino.engine.cli import main as cli_main

    assert cli_main(["parity", "--preset", "demo", "--rtol", "-1"]) == 2
    assert cli_main(["parity", "--preset", "demo", "--steps", "0"]) == 2
    assert cli_main(["bench", "--preset", "demo", "--steps", "0"]) == 2
    assert cli_main(["bench", "--preset", "demo", "--threshold", "1.5"]) == 2
    assert cli_main(["bench", "--compare", "x.json"]) == 2  # --compare needs --baseline
    assert cli_main(["profile", "--preset", "demo", "--emit-nvtx"]) == 2


def test_incomplete_parity_run_is_named_as_such(tmp_path):
    _bench(tmp_path / "a" / "bench.json", "NVIDIA H100", "simdino_vitb16-bf16-1", "2026-01-01T00:00:00+00:00", 10.0, 5.0)
    path = tmp_path / "p" / "parity.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"kind": "flashdino.parity", "meta": {"device": {"name": "NVIDIA H100", "type": "cuda"},
                                                                     "date": "2026-01-01T00:00:00+00:00"},
                                "config": {"label": "simdino_vitb16-bf16-1"}, "ok": False, "first_failure_step": None,
                                "stopped_early": "time limit", "steps": [{}] * 120, "workload": {"steps": 200}}))
    row = next(line for line in latest_table(str(tmp_path)).splitlines() if line.startswith("| NVIDIA"))
    assert "incomplete (120 of 200 steps, all within tolerance)" in row


def _variant_bench(path, date, engine_ips, variant_ips):
    _bench(path, "NVIDIA H100", "simdino_vitb16-bf16-1", date, engine_ips, 1.0)
    report = json.loads(path.read_text())
    del report["sides"]["reference"]
    report["speedup"] = None
    report["sides"]["variant"] = {"images_per_s": variant_ips, "mfu": 0.6, "peak_mem_mib": {"allocated": 10240.0}}
    report["variant"] = {"overrides": ["runtime.multicrop=packed"], "speedup_vs_engine": variant_ips / engine_ips}
    path.write_text(json.dumps(report))


def test_a_newer_variant_run_gets_its_own_table_and_keeps_the_engine_vs_reference_row(tmp_path):
    _bench(tmp_path / "a" / "bench.json", "NVIDIA H100", "simdino_vitb16-bf16-1", "2026-01-01T00:00:00+00:00", 1000.0, 500.0)
    _variant_bench(tmp_path / "v1" / "bench.json", "2026-01-02T00:00:00+00:00", 990.0, 1089.0)
    _variant_bench(tmp_path / "v2" / "bench.json", "2026-01-03T00:00:00+00:00", 1000.0, 1050.0)
    table = latest_table(str(tmp_path))
    main_rows = [line for line in table.splitlines() if line.startswith("| NVIDIA") and "`" not in line]
    (variant_row,) = [line for line in table.splitlines() if "`runtime.multicrop=packed`" in line]
    assert len(main_rows) == 1 and "| 1000.0 | 500.0 | 2.00x |" in main_rows[0]
    assert "| 1000.0 | 1050.0 | 1.050x | 20.00 | 10.00 | 2026-01-03 |" in variant_row  # the newest A/B
    assert "Engine variants" in table
    # Variant runs alone: the "no results" message, then their table.
    only = tmp_path / "only"
    _variant_bench(only / "v" / "bench.json", "2026-01-03T00:00:00+00:00", 1000.0, 1050.0)
    table = latest_table(str(only))
    assert "No bench results" in table and "`runtime.multicrop=packed`" in table
