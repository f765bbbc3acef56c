"""Clean-probability fit: clear_fast vs scikit-learn, as a table, written to benchmarks/results/.

    python benchmarks/mixture_table.py [--repeats 7] [--sizes 1000 10000 67349 100000 1000000]

Times clean_probability(losses) end to end (validation, kmeans init, EM, posteriors) against
sklearn.mixture.GaussianMixture(2, random_state=0).fit(X) + predict_proba(X) on the same
loss-like data (70 % near-zero exponential, 30 % gamma), with the released CleaR settings (tol
1e-3, reg_covar 1e-6, max_iter 100) and DivideMix's (tol 1e-2, reg_covar 5e-4, max_iter 10).
sklearn runs with its default thread pools and again limited to one thread (threadpoolctl), as
clear_fast runs torch on one thread. Median of --repeats runs, interleaved so that all see the
same machine load, each after a 0.3 s pause (OpenMP workers go idle); each row
also reports max |p_clear_fast - p_sklearn| so that a fast but wrong fit cannot win. On a CUDA
machine the data live on the GPU and each run ends with torch.cuda.synchronize(). Results go to
benchmarks/results/mixture_<cpu|gpu name>.json and .md.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

import numpy as np
import torch

SETTINGS = {"released": dict(tol=1e-3, reg_covar=1e-6, max_iter=100),
            "dividemix": dict(tol=1e-2, reg_covar=5e-4, max_iter=10)}


def loss_like(n, seed=0):
    rng = np.random.default_rng(seed)
    n_noisy = int(0.3 * n)
    return rng.permutation(np.concatenate([rng.exponential(0.05, n - n_noisy),
                                           rng.gamma(2.0, 1.5, n_noisy)]))


def timed(fn, sync, settle=0.3):
    # let the other library's OpenMP workers stop spinning (they spin ~200 ms after a parallel
    # region and, on 2 cores, slowed whichever call came next several-fold in interleaved runs)
    time.sleep(settle)
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def run(sizes, repeats, sklearn_max_n):
    """Yields one row per (settings, N) as it is measured."""
    from sklearn.mixture import GaussianMixture
    from threadpoolctl import threadpool_limits

    from clear_fast.mixture import clean_probability

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name, opts in SETTINGS.items():
        for n in sizes:
            x = loss_like(n)
            losses = torch.from_numpy(x).cuda() if cuda else x

            def ours():
                return clean_probability(losses, **opts)[0]

            def sklearn():
                gm = GaussianMixture(2, random_state=0, **opts).fit(x[:, None])
                return gm.predict_proba(x[:, None])[:, np.argmin(gm.means_.ravel())]

            def sklearn_1t():
                with threadpool_limits(1):
                    return sklearn()

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DivideMix's max_iter=10 may not converge
                for _ in range(2):  # warm-up: imports, Triton compilation, allocator
                    p = ours()
                sync()
                ref_runs = repeats if n <= sklearn_max_n else 0
                t_ours, t_ref, t_ref1 = [], [], []
                for i in range(repeats):
                    t_ours.append(timed(ours, sync)[0])
                    if i < ref_runs:
                        dt, p_ref = timed(sklearn, lambda: None)
                        t_ref.append(dt)
                        t_ref1.append(timed(sklearn_1t, lambda: None)[0])
            ms = statistics.median(t_ours)
            row = dict(settings=name, n=n, clear_fast_ms=1e3 * ms)
            if t_ref:
                p = p.cpu().numpy() if isinstance(p, torch.Tensor) else p
                row.update(sklearn_ms=1e3 * statistics.median(t_ref),
                           sklearn_1thread_ms=1e3 * statistics.median(t_ref1),
                           speedup=statistics.median(t_ref) / ms,
                           speedup_vs_1thread=statistics.median(t_ref1) / ms,
                           max_abs_diff_p=float(np.abs(p - p_ref).max()))
            print(_fmt(row), flush=True)
            yield row


def _fmt(row):
    ref = (f"{row['sklearn_ms']:10.2f} {row['speedup']:8.1f}x {row['sklearn_1thread_ms']:10.2f} "
           f"{row['speedup_vs_1thread']:8.1f}x  {row['max_abs_diff_p']:.1e}"
           if "sklearn_ms" in row else f"{'-':>10} {'-':>9} {'-':>10} {'-':>9}  -")
    return f"{row['settings']:<10} {row['n']:>8} {row['clear_fast_ms']:10.2f} {ref}"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.machine()


def machine():
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                python=platform.python_version(), torch=torch.__version__,
                numpy=np.__version__, cpu=_cpu_name(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        import sklearn
        import triton

        info.update(sklearn=sklearn.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        with open("/proc/loadavg") as f:
            info["load_average"] = f.read().split()[:3]
    except OSError:
        pass
    return info


def save_json_and_md(out_dir, stem, result, md):
    """out_dir/stem.json (result) and out_dir/stem.md, each replaced whole or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    for ext, text in (("json", json.dumps(result, indent=1)), ("md", md)):
        path = os.path.join(out_dir, f"{stem}.{ext}")
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)


def device_tag(device):
    """The results files' name for a machine: cpu, or gpu_<name> (gpu_nvidia_h200)."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return "gpu_" + torch.cuda.get_device_name(device).replace(" ", "_").lower()


def write_table(base, info, repeats, rows, command):
    with open(base + ".json", "w") as f:
        json.dump(dict(machine=info, repeats=repeats, rows=rows), f, indent=2)
    with open(base + ".md", "w") as f:
        f.write("# Clean-probability fit: clear_fast vs scikit-learn\n\n")
        f.write(f"`{command}`, median of "
                f"{repeats} runs (sklearn interleaved), loss-like data.\n\n")
        f.write("Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()) + "\n\n")
        f.write("| settings | N | clear_fast ms | sklearn ms | speedup | sklearn 1-thread ms | "
                "speedup vs 1-thread | max abs diff p |\n"
                "|---|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['settings']} | {r['n']} | {r['clear_fast_ms']:.2f} | "
                    + (f"{r['sklearn_ms']:.2f} | {r['speedup']:.1f}x | "
                       f"{r['sklearn_1thread_ms']:.2f} | {r['speedup_vs_1thread']:.1f}x | "
                       f"{r['max_abs_diff_p']:.1e}"
                       if "sklearn_ms" in r else "- | - | - | - | -") + " |\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 67349, 100000,
                                                                  1000000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sklearn-max-n", type=int, default=1000000)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    info = machine()
    print(json.dumps(info))
    print(f"{'settings':<10} {'N':>8} {'ours ms':>10} {'sklearn ms':>10} {'speedup':>9} "
          f"{'skl 1t ms':>10} {'speedup':>9}  max|dp|")
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, f"mixture_{device_tag('cuda' if torch.cuda.is_available() else 'cpu')}")
    command = " ".join(["python benchmarks/mixture_table.py", *sys.argv[1:]])
    rows = []
    for row in run(args.sizes, args.repeats, args.sklearn_max_n):
        rows.append(row)
        write_table(base, info, args.repeats, rows, command)  # every row: a run cut short keeps its rows
    print("wrote", base + ".json", "and", base + ".md")


if __name__ == "__main__":
    main()
