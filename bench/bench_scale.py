"""Scale: ResNet-18 (BatchNorm in eval mode) and VGG-11 (no BatchNorm, 9.2M parameters) on N = 128
CIFAR-shaped synthetic images, CPU.

Each task runs in its own process (so its peak RSS is its own) and reports its wall time, its peak
RSS, and the time of one full-batch gradient measured in the same process (the baseline, so ratios
compare across machines): the sampled escape indicator (m = 32), the top-5 Hessian eigenpairs
(relative residual 1e-2), alignment with k = 1, 100 expected-sharpness draws, 10 GLD steps with
the ``diag`` and the ``hessian`` structures, and the cost of one Hessian-vector product per column.
Where PyHessian is installed (a bench-only extra: ``pip install --no-deps pyhessian``), its top-5
eigenvalues on the same model and data, with time and agreement against ours.

Usage: ``python bench/bench_scale.py [--quick] [--models resnet18 vgg11] [--memory-budget 6G]
[--out bench/out/scale.json]``
(``--quick``: width/8 models and N = 16, a smoke run of the same code in about a minute).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
TASKS = (
    "hvp_cost",
    "indicator_sampled",
    "top5_eigenpairs",
    "alignment_k1",
    "sharpness_100",
    "gld_diag_10",
    "gld_hessian_10",
    "pyhessian_top5",
)


class _Block(nn.Module):
    """A ResNet basic block: two 3×3 convolutions with BatchNorm, identity or 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(h)) + self.short(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32×32 inputs (3×3 stem, no max-pool): 11.2M parameters at width 64."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()
        )
        layers, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                layers.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class VGG11(nn.Module):
    """VGG-11 (configuration A: 64-M-128-M-256-256-M-512-512-M-512-512-M) for 32×32 inputs, no
    BatchNorm, one linear classifier: 9.2M parameters at width 64 (the released code's network)."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        cfg = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
        layers: list[nn.Module] = []
        cin = 3
        for c in cfg:
            if c == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, width * c, 3, padding=1), nn.ReLU(inplace=True)]
                cin = width * c
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _build(name: str, quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    width = 8 if quick else 64
    model = (ResNet18 if name == "resnet18" else VGG11)(width=width).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # He initialisation from an explicit generator
        for module in model.modules():
            for pname, p in module.named_parameters(recurse=False):
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p[0].numel()) ** 0.5)
                else:  # biases 0, BatchNorm scales 1
                    p.fill_(
                        1.0 if isinstance(module, nn.BatchNorm2d) and pname == "weight" else 0.0
                    )
    n = 16 if quick else 128
    return (
        model,
        torch.randn(n, 3, 32, 32, generator=gen),
        torch.randint(0, 10, (n,), generator=gen),
    )


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _task(name: str, task: str, quick: bool, budget: str, queue: mp.Queue) -> None:
    try:
        queue.put(_run_task(name, task, quick, budget))
    except Exception as exc:  # reported in the JSON, the bench goes on
        queue.put({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})


def _run_task(name: str, task: str, quick: bool, budget: str) -> dict:
    import sgdnoise

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, x, y = _build(name, quick)
    problem = sgdnoise.Problem(model, F.cross_entropy, x, y, memory_budget=budget)
    start = time.perf_counter()
    problem.gradient()
    grad_s = time.perf_counter() - start
    out: dict = {"gradient_s": grad_s, "D": problem.dim, "N": problem.num_samples}
    b = min(32, problem.num_samples)  # SGD's mini-batch size whose noise is measured
    start = time.perf_counter()
    if task == "hvp_cost":
        V = torch.randn(problem.dim, 2, generator=torch.Generator().manual_seed(0))
        sgdnoise.hessian(problem) @ V[:, :1]  # the one-time self-check happens here
        t0 = time.perf_counter()
        sgdnoise.hessian(problem) @ V
        out["hvp_per_column_s"] = (time.perf_counter() - t0) / 2
        out["hvp_per_column_over_gradient"] = out["hvp_per_column_s"] / grad_s
    elif task == "indicator_sampled":
        ind = sgdnoise.escape_indicator(
            problem, b, num_samples=min(32, problem.num_samples), generator=0
        )
        out.update(tr_HS=ind.tr_HS, stderr=ind.stderr, tr_HS_iso=ind.tr_HS_iso, ratio=ind.ratio)
    elif task == "top5_eigenpairs":
        pairs = sgdnoise.top_eigenpairs(sgdnoise.hessian(problem), 5, tol=1e-2, generator=0)
        out.update(eigenvalues=pairs.eigenvalues.tolist(), matvecs=pairs.num_matvecs,
                   converged=pairs.converged)  # fmt: skip
    elif task == "alignment_k1":
        al = sgdnoise.alignment(problem, b, k=1, generator=0, tol=1e-2)
        out.update(a=al.a, lambda_1=al.lambda_1)
    elif task == "sharpness_100":
        sh = sgdnoise.expected_sharpness(problem, 1e-3, 100, generator=0)
        out.update(signed=sh.signed, stderr=sh.signed_stderr)
    elif task in ("gld_diag_10", "gld_hessian_10"):
        structure = task.split("_")[1]
        options = {"k": 5, "tol": 1e-2} if structure == "hessian" else {}
        out["loss_0"] = float(problem.loss())
        opt = sgdnoise.make_optimizer(
            f"gld_{structure}",
            problem,
            1e-4,  # below 2/λ_max (ResNet-18 at this initialisation: λ_max ≈ 4.7e3; 0.01 diverges)
            generator=0,
            batch_size=b,
            refresh_every=10,
            **options,
        )
        for _ in range(10):
            opt.step()
        out["loss"] = float(problem.loss())
    elif task == "pyhessian_top5":
        try:
            from pyhessian import hessian as pyhessian_hessian
        except ImportError:
            return {"skipped": "PyHessian not installed (pip install --no-deps pyhessian)"}
        torch.manual_seed(0)  # PyHessian draws its start vectors from the global generator
        comp = pyhessian_hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        values, vectors = comp.eigenvalues(top_n=5, tol=1e-2)
        out["wall_s"] = time.perf_counter() - start
        out["eigenvalues"] = sorted(values, reverse=True)
        # accuracy, outside the timing: relative residuals ‖Hu − λu‖/|λ| of PyHessian's pairs,
        # by our Hessian products (the same H: BatchNorm in eval mode, the same data)
        del comp
        U = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors], dim=1)
        U = U / U.norm(dim=0)
        lam = torch.tensor(values, dtype=U.dtype)
        R = sgdnoise.hessian(problem) @ U - U * lam
        out["relative_residuals"] = (R.norm(dim=0) / lam.abs()).tolist()
        out["peak_rss_gb"] = _peak_rss_gb()
        return out
    else:
        raise ValueError(f"unknown task {task!r}")
    out["wall_s"] = time.perf_counter() - start
    out["peak_rss_gb"] = _peak_rss_gb()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width/8 models, N = 16")
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg11"])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--device", default="cpu", help="cpu only for now")
    parser.add_argument("--out", default=str(HERE / "out" / "scale.json"))
    parser.add_argument("--memory-budget", default="6G", help="sgdnoise's memory budget per "
                        "task (the target is a peak RSS of at most 8 GB)")  # fmt: skip
    args = parser.parse_args()
    if args.device != "cpu":
        print("bench_scale: only --device cpu is measured for now; skipping", file=sys.stderr)
        return 0
    ctx = mp.get_context("spawn")
    result: dict = {"quick": args.quick, "models": {}}
    for name in args.models:
        rows = {}
        for task in args.tasks:
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_task, args=(name, task, args.quick, args.memory_budget, queue)
            )
            proc.start()
            rows[task] = queue.get()
            proc.join()
            print(f"{name:9s} {task:18s} {json.dumps(rows[task])[:200]}", flush=True)
            # written after every task: a stopped bench keeps the rows it has
            result["models"][name] = rows
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        ours, theirs = rows.get("top5_eigenpairs", {}), rows.get("pyhessian_top5", {})
        if "eigenvalues" in ours and "eigenvalues" in theirs:
            a, b = torch.tensor(ours["eigenvalues"]), torch.tensor(theirs["eigenvalues"])
            rows["vs_pyhessian"] = {
                "speedup": theirs["wall_s"] / ours["wall_s"],
                "max_relative_difference": float(((a - b).abs() / a.abs()).max()),
                # ours: every relative residual ≤ 1e-2 (tol); PyHessian's, measured
                "pyhessian_max_relative_residual": max(theirs.get("relative_residuals", [0.0])),
            }
        result["models"][name] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
