"""Hessian-vector products of a :class:`~sgdnoise.problem.Problem`: forward-over-reverse with
fallbacks to double backward, a one-time check against finite differences, and the diagnosis of
the module that has no second derivative."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .. import _data
from .._utils import check_finite
from ._base import ProblemBase
from ._helpers import (
    MAX_COLUMNS,
    _first_line,
    _map_tensors,
    _math_attention,
    _rtol,
    _slice,
    _tensors,
    raise_if_out_of_memory,
)

#: Hessian-product routes, from the fastest to the most conservative.
_HVP_MODES = ("forward-over-reverse", "double backward", "double backward, column by column")


class HessianProducts(ProblemBase):
    """``∇²L(θ) V`` for :class:`~sgdnoise.problem.Problem` (mixin)."""

    _hvp_mode: str
    _hvp_verified: bool
    _hvp_error: str | None

    def hvp(
        self,
        V: torch.Tensor,
        theta: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        *,
        max_columns: int = MAX_COLUMNS,
        _graph: dict | None = None,
    ) -> torch.Tensor:
        """Hessian products ``∇²L(θ) V`` for ``V`` of shape ``[D, k]`` (or ``[D]``: one product).

        Forward-over-reverse (``vmap`` over ``jvp(grad(L))``): the primal forward/backward is
        shared by all columns and only the tangents are batched, at most ``max_columns`` at a
        time and fewer (and over fewer samples) when the memory budget asks for it. Operations
        without a forward-mode derivative or a batching rule make it fall back, once per problem,
        to batched double backward and then to double backward column by column (recorded in
        ``routes["hvp"]``). A model that convolves (``nn.Conv*`` or ``F.conv*``, found by one
        scan of its forward pass) takes double backward column by column from the start: the
        gradient's graph is built once per chunk of samples and each column costs one backward
        of it, cheaper than vmapped convolution tangents. Attention runs on the math kernel.

        Args:
            V: ``[D, k]`` or ``[D]``, in the model's dtype and on its device.
            theta: the point ``[D]`` (default: the model's current parameters).
            indices: the samples of the mean (default: all).
            _graph: (internal: :meth:`HessianOperator.session`) a dict in which a double-backward
                route keeps the gradient's graph between calls at the same ``theta`` object when
                the samples fit one chunk.

        Returns:
            ``[D, k]`` (``[D]`` for a ``V`` of shape ``[D]``), the products of the mean loss.

        Raises:
            ValueError: ``V`` or ``theta`` of another shape, dtype or device.
            RuntimeError: if no route can differentiate the model twice (names the failing
                operation and what to change).
        """
        self.check_decoupled("Hessian-vector products")
        self.check_directions(V)
        given = theta  # the graph kept in a session is keyed on the caller's θ object
        if V.ndim == 1:
            return self.hvp(V[:, None], theta, indices, max_columns=max_columns, _graph=_graph)[
                :, 0
            ]
        theta = self.point(theta)
        if V.shape[1] == 0:
            return V.clone()
        self._ensure_hvp_verified(theta)
        kind = self._hvp_kind()
        cols, rows = self.plan_columns(min(max_columns, max(1, V.shape[1])), kind)
        graph = self._kept_graph(_graph, kind != "hvp", given, indices, rows)
        chunk = [0]

        def piece(x: Any, y: Any, V: torch.Tensor) -> torch.Tensor:
            chunk[0] += 1
            if chunk[0] > 1 and _graph is not None and graph is not None:
                _graph.clear()  # the data came in several chunks after all: keep nothing
                _graph["off"] = True
            return self._hvp_block(theta, V, x, y, graph if chunk[0] == 1 else None)

        def block(j: int) -> torch.Tensor:  # columns j, …, j + cols − 1, summed over the data
            chunk[0] = 0
            return self.reduce_mean(
                lambda x, y: piece(x, y, V[:, j : j + cols]), indices, rows=rows
            )

        if cols >= V.shape[1]:
            out = block(0)
        else:  # each block summed over the data, written into one [D, k] result (no concatenation)
            out = torch.empty(V.shape, dtype=self.dtype, device=self.device)
            for j in range(0, V.shape[1], cols):
                out[:, j : j + cols] = block(j)
        check_finite(out, "a Hessian-vector product")
        return out

    def hvp_members(self, thetas: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """Hessian products at R parameter vectors at once: ``out[r] = ∇²L(θ_r) V[r]``.

        One pass per chunk of the data for all R members (the loss evaluated at every θ_r under
        ``vmap``), by the problem's Hessian route (see :meth:`hvp`): forward-over-reverse vmapped
        over the members and the columns, or double backward of the members' summed losses —
        their gradients are independent, so ``∂(Σ_r ∇L(θ_r)·v_r)/∂θ_r = H(θ_r) v_r`` — one
        backward per column. A model whose loss has no batching rule over θ falls back, once per
        problem, to one :meth:`hvp` per member (``routes["hvp_members"]``). Each member's product
        equals :meth:`hvp` at its θ up to the rounding of the batched pass.

        Args:
            thetas: ``[R, D]``. V: ``[R, D, k]``.

        Returns:
            ``[R, D, k]``.

        Raises:
            ValueError: shapes that do not match. RuntimeError, MemoryError: as :meth:`hvp`.
        """
        if not isinstance(thetas, torch.Tensor) or not isinstance(V, torch.Tensor):
            raise ValueError("hvp_members needs tensors thetas [R, D] and V [R, D, k]")
        R = thetas.shape[0] if thetas.ndim else 0
        if R < 1 or thetas.shape != (R, self.dim) or V.ndim != 3 or V.shape[:2] != (R, self.dim):
            raise ValueError(
                f"hvp_members needs thetas [R, D] and V [R, D, k] with R ≥ 1 and D = {self.dim}, "
                f"got {list(thetas.shape)} and {list(V.shape)}"
            )
        if thetas.dtype != self.dtype or V.dtype != self.dtype:
            raise ValueError(
                f"hvp_members needs thetas and V in the model's dtype {self.dtype}, got "
                f"{thetas.dtype} and {V.dtype} (cast them with .to({self.dtype}))"
            )
        if thetas.device != self.device or V.device != self.device:
            raise ValueError(
                f"hvp_members needs thetas and V on the model's device {self.device}, got "
                f"{thetas.device} and {V.device} (move them with .to({str(self.device)!r}))"
            )
        if V.shape[2] == 0:
            return V.clone()
        thetas = thetas.detach()
        if not self._hvp_verified:  # the route and its check, once, as for hvp
            self.hvp(V[0, :, :1], thetas[0])
        if self.routes.get("hvp_members", "").startswith("one product per member") or R == 1:
            return torch.stack([self.hvp(V[r], thetas[r]) for r in range(R)])
        forward = self._hvp_mode == "forward-over-reverse"
        kind = "hvp" if forward else "double_backward"
        cols, rows = self.plan_columns(V.shape[2], kind)
        rows = max(1, rows // R)
        try:
            out = self.reduce_mean(
                lambda x, y: torch.cat(
                    [
                        self._hvp_members_block(thetas, V[:, :, j : j + cols], x, y, forward)
                        for j in range(0, V.shape[2], cols)
                    ],
                    dim=2,
                ),
                rows=rows,
            )
        except (NotImplementedError, RuntimeError) as exc:
            raise_if_out_of_memory(exc)
            self.routes["hvp_members"] = (
                f"one product per member: the batched pass failed ({_first_line(exc)})"
            )
            return torch.stack([self.hvp(V[r], thetas[r]) for r in range(R)])
        self.routes.setdefault("hvp_members", f"{self._hvp_mode}, batched over members")
        check_finite(out, "a Hessian-vector product")
        return out

    def _hvp_members_block(
        self, thetas: torch.Tensor, V: torch.Tensor, x: Any, y: Any, forward: bool
    ) -> torch.Tensor:
        with _math_attention():
            if forward:
                return vmap(lambda th, Vm: self._forward_over_reverse(th, Vm, x, y))(thetas, V)
            th = thetas.clone().requires_grad_(True)
            with torch.enable_grad():
                losses = vmap(lambda t: self.batch_loss(t, x, y))(th)
                (g,) = torch.autograd.grad(losses.sum(), th, create_graph=True)
                if not g.requires_grad:  # the loss is linear in θ: H = 0
                    return torch.zeros_like(V)
                return _columns(g, th, V)

    def _forward_over_reverse(
        self, theta: torch.Tensor, V: torch.Tensor, x: Any, y: Any
    ) -> torch.Tensor:
        """``∇²L V`` on the batch ``(x, y)``: ``jvp`` of ``grad`` vmapped over the columns."""
        gfun = grad(lambda t: self.batch_loss(t, x, y))
        # "+ 0 * v" keeps the output batched when H = 0 (a loss linear in θ).
        return vmap(lambda v: jvp(gfun, (theta,), (v,))[1] + 0 * v, in_dims=1, out_dims=1)(V)

    def _kept_graph(
        self, store: dict | None, double: bool, theta: Any, indices: Any, rows: int
    ) -> dict | None:
        """``store`` when this call may keep (or use) the gradient's graph in it, else ``None``
        (and ``store`` emptied of a graph that no longer applies). Kept only for a double-backward
        route whose samples come in one chunk (then the memory plan covers the kept graph), for
        the same θ and indices objects, and nothing it saved changed in place since
        (:meth:`_state_versions`)."""
        if store is None or not double or theta is None or store.get("off"):
            return None
        if not self._one_chunk(indices, rows):
            store.clear()  # chunked passes rebuild their graphs: a kept one would be outside the plan
            return None
        key = (theta, indices, self._state_versions(theta, indices))
        old = store.get("key")
        if old is None or old[0] is not theta or old[1] is not indices or old[2] != key[2]:
            store.clear()  # a graph of another θ or samples, or of a state changed since
        store["key"] = key
        return store

    def _state_versions(self, theta: torch.Tensor, indices: Any) -> tuple[int, ...]:
        """Version counters of everything a kept graph saved: θ, the model's parameters (those
        outside θ are constants of the graph) and buffers (BatchNorm statistics), the data
        tensors and the indices — any in-place change (an optimizer step, ``copy_``, ``x.mul_``)
        makes the graph stale. Changes through ``.data`` or NumPy views bump no counter."""
        tensors = [theta, *self.model.parameters(), *self.model.buffers()]
        source = self._source
        if isinstance(source, _data.TensorSource):
            tensors += list(_tensors((source.inputs, source.targets)))
        if isinstance(indices, torch.Tensor):
            tensors.append(indices)
        return tuple(t._version for t in tensors)

    def _one_chunk(self, indices: torch.Tensor | None, rows: int) -> bool:
        """Whether a pass of ``rows`` samples per chunk goes through the selection in one chunk."""
        idx = self.check_indices(indices)
        if self._shard is not None:  # this rank's part of the selection, as chunks() takes it
            idx = self._shard.split(idx)[1]
        return self._source.one_chunk(idx, rows)

    def _ensure_hvp_verified(self, theta: torch.Tensor) -> None:
        """The once-per-problem check of the Hessian route (:meth:`_verify_hvp`), which also
        chooses it; raises the recorded error of a model that cannot be differentiated twice."""
        if self._hvp_error is not None:
            raise RuntimeError(self._hvp_error)
        if not self._hvp_verified:
            self._hvp_verified = True
            try:
                self._verify_hvp(theta)
            except RuntimeError as exc:
                self._hvp_verified = False  # running out of memory is no verdict on the model
                raise_if_out_of_memory(exc)
                self._hvp_verified = True
                self._hvp_error = str(exc)
                raise

    def _hvp_kind(self) -> str:
        """The pass kind of the current Hessian route (for the memory plan)."""
        return {"forward-over-reverse": "hvp", "double backward": "double_backward_batched"}.get(
            self._hvp_mode, "double_backward"
        )

    def keeps_hessian_graph(
        self, theta: torch.Tensor | None = None, indices: torch.Tensor | None = None
    ) -> bool:
        """Whether Hessian products at ``theta`` over ``indices`` keep the gradient's graph
        between calls in a :meth:`HessianOperator.session`: a double-backward route (chosen by
        the first product's check, which this runs) and the samples within one chunk of the
        memory budget for one column. Then a product costs one backward of the kept graph, and
        a solver's blocks after the first cost no forward pass."""
        self.check_decoupled("Hessian-vector products")
        self._ensure_hvp_verified(self.point(theta))
        kind = self._hvp_kind()
        return kind != "hvp" and self._one_chunk(indices, self.plan_columns(1, kind)[1])

    def _gradient_graph(
        self, theta: torch.Tensor, x: Any, y: Any, graph: dict | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(θ leaf, ∇L on (x, y) with its graph)`` for double backward; from ``graph`` when it
        holds them (:meth:`hvp` clears it for another θ or other samples)."""
        if graph is not None and "g" in graph:
            return graph["th"], graph["g"]
        th = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self.batch_loss(th, x, y)
            (g,) = torch.autograd.grad(loss, th, create_graph=True)
        if graph is not None:
            graph.update(th=th, g=g)
        return th, g

    def _hvp_block(
        self,
        theta: torch.Tensor,
        V: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        graph: dict | None = None,
    ) -> torch.Tensor:
        with _math_attention():
            if self._hvp_mode == "forward-over-reverse":
                try:
                    return self._forward_over_reverse(theta, V, x, y)
                except (NotImplementedError, RuntimeError) as exc:
                    raise_if_out_of_memory(exc)
                    self._hvp_mode = "double backward"
                    self.routes["hvp"] = (
                        f"double backward: forward-over-reverse failed ({_first_line(exc)})"
                    )
            try:
                th, g = self._gradient_graph(theta, x, y, graph)
                with torch.enable_grad():
                    if not g.requires_grad:  # the loss is linear in θ: H = 0
                        return torch.zeros_like(V)
                    if V.shape[1] == 1 or self._hvp_mode == "double backward, column by column":
                        return _columns(g, th, V)
                    try:
                        (hv,) = torch.autograd.grad(
                            g,
                            th,
                            grad_outputs=V.T,
                            is_grads_batched=True,
                            retain_graph=True,
                            allow_unused=True,
                        )
                        return torch.zeros_like(V) if hv is None else hv.T  # None: H = 0
                    except (NotImplementedError, RuntimeError) as exc:
                        raise_if_out_of_memory(exc)
                        self._hvp_mode = "double backward, column by column"
                        self.routes["hvp"] = (
                            f"double backward column by column: batched products failed "
                            f"({_first_line(exc)})"
                        )
                        return _columns(g, th, V)
            except (NotImplementedError, RuntimeError) as exc:
                raise_if_out_of_memory(exc)
                where = self._module_without_second_derivative(x)
                raise RuntimeError(
                    "Hessian-vector products need second derivatives of the model, and PyTorch has "
                    f"none for an operation{where}: {_first_line(exc)}. Replace that operation by "
                    "one with a double-backward rule (fused attention: torch.nn.attention."
                    "sdpa_kernel(SDPBackend.MATH) around your own call; a custom autograd.Function: "
                    "make its backward differentiable, without @once_differentiable), then run "
                    "sgdnoise.check(problem)."
                ) from exc

    def _verify_hvp(self, theta: torch.Tensor) -> None:
        """Once per problem: ``H v`` against central differences of ∇L on the first 4 samples.

        Catches a wrong second derivative anywhere in the model or in PyTorch (a custom
        ``autograd.Function`` whose backward is not differentiable returns a wrong product without
        any error). The rule is :func:`sgdnoise.diagnostics.hvp_finite_difference_check` (the
        one :func:`sgdnoise.check` reports): differences at several step sizes, on a float64 copy
        of the model below float64; inconclusive directions (ReLU kinks) pass. Skipped for
        models above 2^27 parameters, where the copy would cost too much memory (the scan of the
        forward pass that picks the route still runs).
        """
        if self._shard is not None:  # each rank checks its own samples (a local twin)
            self._verify_hvp_sharded(theta)
            return
        few = torch.arange(min(self.num_samples, 4), device=self.device)
        rule = self._route_by_scan(few)
        if self.dim > 2**27:
            self.routes["hvp_check"] = "skipped (D > 2^27); run sgdnoise.check(problem)"
            return
        from .._finite_differences import hvp_finite_difference_check

        # Finite differences on a few samples (the model's derivative rules); symmetry on up to
        # 16 samples spread over the data, as some rules depend on the data (padding tokens).
        spread = torch.linspace(0, self.num_samples - 1, min(self.num_samples, 16))
        spread = spread.round().long().unique().to(self.device)
        if not self._hvp_symmetric(theta, spread):
            if self._hvp_mode != "forward-over-reverse":
                where = self._module_without_second_derivative(self._source.take(few[:1])[0])
                raise RuntimeError(
                    "Hessian-vector products are not symmetric for this model (uᵀHv ≠ vᵀHu) by "
                    f"double backward: an operation{where or ' in the model'} has inconsistent "
                    "second derivatives — typically a custom autograd.Function whose backward is "
                    "not itself differentiable (@once_differentiable, or torch.no_grad / .detach() "
                    "inside backward). Make that backward differentiable; sgdnoise.check(problem) "
                    "reports the details."
                )
            self._hvp_mode = "double backward"
            self.routes["hvp"] = (
                "double backward: forward-over-reverse gives a non-symmetric H (a forward-mode "
                "rule disagrees with its backward, e.g. Embedding(padding_idx))"
            )
            if not self._hvp_symmetric(theta, spread):
                raise RuntimeError(
                    "Hessian-vector products are not symmetric for this model (uᵀHv ≠ vᵀHu) by "
                    "forward-over-reverse or by double backward. Run sgdnoise.check(problem)."
                )
            # The gradient itself is not the derivative of the loss along every direction
            # (e.g. padding rows whose gradient is zero by convention): finite differences of
            # it cannot judge H, the symmetric route is the one consistent with the gradient.
            self.routes["hvp_check"] = "symmetric by double backward (finite differences skipped)"
            return
        result = hvp_finite_difference_check(
            cast(Any, self), theta, few, torch.Generator().manual_seed(0), levels=3
        )
        if result.passed:
            self.routes["hvp_check"] = result.detail
            return
        if rule is not None:  # the gradient is zero by convention on padding rows: finite
            # differences of it cannot judge H there (as above)
            self.routes["hvp_check"] = "symmetric by double backward (finite differences skipped)"
            return
        where = self._module_without_second_derivative(self._first_sample())
        raise RuntimeError(
            f"Hessian-vector products are wrong for this model{where}: {result.detail}"
        )

    def _route_by_scan(self, few: torch.Tensor) -> str | None:
        """The route that one scan of the forward pass dictates (see :meth:`_scan_operations`),
        for every model, large or sharded too; returns the data-dependent rule found, if any."""
        rule, convolves = self._scan_operations(few)
        if convolves and self._hvp_mode == "forward-over-reverse":
            # A structural, deterministic choice (never a timing): vmap batches the tangents of a
            # convolution through grouped convolutions, which cost more than one backward of the
            # gradient per column (bench/bench_scale.py: 3.1x a gradient per column against 2.1x
            # on ResNet-18, 2.9x against 2.0x on VGG-11, 1.29x against 1.23x on the paper's CNN).
            self._hvp_mode = _HVP_MODES[2]
            self.routes["hvp"] = (
                f"{_HVP_MODES[2]}: the model convolves ({convolves}), where forward-over-reverse "
                "costs more per column"
            )
        if rule is not None and self._hvp_mode == "forward-over-reverse":
            self._hvp_mode = "double backward"
            self.routes["hvp"] = (
                f"double backward: {rule} — its forward-mode rule disagrees with its backward on "
                "some samples (a data-dependent rule, not left to a check on a few samples)"
            )
        return rule

    def _hvp_symmetric(self, theta: torch.Tensor, few: torch.Tensor) -> bool:
        """``|uᵀHv − vᵀHu| ≤ tol (|uᵀHv| + |vᵀHu|)`` for two random vectors (the route's check)."""
        gen = torch.Generator().manual_seed(1)
        UV = torch.randn(self.dim, 2, generator=gen, dtype=torch.float64).to(
            self.device, self.dtype
        )
        with torch.no_grad():
            HUV = self.hvp_unchecked(UV, theta, few).double()
        uhv, vhu = float(UV[:, 0].double() @ HUV[:, 1]), float(UV[:, 1].double() @ HUV[:, 0])
        scale = float(UV.double().norm(dim=0).prod() * HUV.norm(dim=0).max())
        return abs(uhv - vhu) <= 100 * _rtol(self.dtype) * (abs(uhv) + abs(vhu) + 1e-3 * scale)

    def _verify_hvp_sharded(self, theta: torch.Tensor) -> None:
        """Each rank checks the rules on its own samples (a local twin, no collectives), then one
        all-reduce makes every rank take the most conservative route any rank found (a
        data-dependent rule may show on one shard only) or raise together."""
        assert self._shard is not None
        twin = self.local_shard()
        assert isinstance(twin, HessianProducts)
        modes = list(_HVP_MODES)
        error = None
        try:
            twin._verify_hvp(theta)
        except RuntimeError as exc:
            raise_if_out_of_memory(exc)
            error = exc
        code = len(modes) if error is not None else modes.index(twin._hvp_mode)
        flag = torch.tensor([float(code)], device=self.device)
        worst = int(self._shard.all_reduce(flag, torch.distributed.ReduceOp.MAX))
        if error is not None:
            raise error
        if worst == len(modes):
            raise RuntimeError(
                "the check of Hessian-vector products failed on another rank of this sharded "
                "problem (that rank's error names the module and the fix)"
            )
        self.routes.update(twin.routes)
        self._hvp_mode = modes[max(worst, code)]
        if worst > code:
            self.routes["hvp"] = f"{modes[worst]}: chosen by another rank's check of its samples"

    def _scan_operations(self, few: torch.Tensor) -> tuple[str | None, str | None]:
        """One forward pass on ``few`` samples under a ``TorchFunctionMode``: ``(rule, conv)``,
        an operation whose forward-mode derivative is wrong on some inputs only (``embedding``
        with a ``padding_idx``) and the first convolution met (module or functional), each
        ``None`` if there is none."""
        found: list[str] = []
        convs: list[str] = []
        conv_funcs = {
            torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
            torch.conv_transpose1d: "conv_transpose1d", torch.conv_transpose2d: "conv_transpose2d",
            torch.conv_transpose3d: "conv_transpose3d", torch.convolution: "convolution",
            torch.nn.functional.conv1d: "conv1d", torch.nn.functional.conv2d: "conv2d",
            torch.nn.functional.conv3d: "conv3d",
        }  # fmt: skip

        class Scan(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in conv_funcs:
                    convs.append(conv_funcs[func])
                if func is torch.embedding or func is torch.nn.functional.embedding:
                    # F.embedding(input, weight, padding_idx=None, …) is what the mode sees for
                    # nn.Embedding (the nested torch.embedding is not intercepted)
                    pad = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
                    if pad is not None and pad != -1:
                        found.append(f"embedding with padding_idx={pad}")
                elif func is torch.nn.functional.embedding_bag:
                    pad = args[10] if len(args) > 10 else kwargs.get("padding_idx")
                    if pad is not None:
                        found.append(f"embedding_bag with padding_idx={pad}")
                return func(*args, **kwargs)

        x, y = self._source.take(few)
        with torch.no_grad(), Scan():
            self.batch_loss(self.theta(), x, y)
        return (found[0] if found else None), (convs[0] if convs else None)

    def hvp_unchecked(
        self, V: torch.Tensor, theta: torch.Tensor, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """:meth:`hvp` without the one-time finite-difference check (for diagnostics)."""
        saved = self._hvp_verified, self._hvp_error
        self._hvp_verified, self._hvp_error = True, None
        try:
            return self.hvp(V, theta, indices)
        finally:
            self._hvp_verified, self._hvp_error = saved

    def _module_without_second_derivative(self, x: torch.Tensor) -> str:
        """`` in module NAME (Type)`` for the innermost module that cannot be differentiated twice
        on its own (a diagnosis run only after a failure), or ``""``."""
        calls: list[tuple[nn.Module, tuple[object, ...], dict[str, object]]] = []

        def record(module: nn.Module, args: tuple, kwargs: dict, _: object) -> None:
            calls.append((module, args, kwargs))

        handles = [m.register_forward_hook(record, with_kwargs=True) for m in self.model.modules()]
        try:
            with torch.no_grad():
                _data.call_model(self.model, _slice(x, 0))
        except Exception:  # the diagnosis must not hide the original error
            return ""
        finally:
            for h in handles:
                h.remove()
        names = {id(m): n for n, m in self.model.named_modules()}

        def fresh(t: torch.Tensor) -> torch.Tensor:
            return t.detach().requires_grad_(t.is_floating_point())

        for module, args, kwargs in calls:  # post-hooks fire innermost first
            args2, kwargs2 = _map_tensors(fresh, tuple(args)), _map_tensors(fresh, dict(kwargs))
            ins = [t for t in _tensors((args2, kwargs2)) if t.requires_grad]
            ins += [p for p in module.parameters() if p.requires_grad]
            try:
                with torch.enable_grad():
                    outs = [o for o in _tensors(module(*args2, **kwargs2)) if o.requires_grad]
            except Exception:  # a module that cannot run on its own: try the next one
                continue
            if not outs or not ins:
                continue
            try:
                with torch.enable_grad():
                    total: Any = sum((o * o).sum() for o in outs)
                    grads = torch.autograd.grad(total, ins, create_graph=True, allow_unused=True)
                    second = sum(g.sum() for g in grads if g is not None and g.requires_grad)
                    if isinstance(second, torch.Tensor):
                        torch.autograd.grad(second, ins, allow_unused=True)
            except (RuntimeError, NotImplementedError) as exc:
                raise_if_out_of_memory(exc)
                name = names.get(id(module)) or "(the model itself)"
                return f" in module {name} ({type(module).__name__})"
        return ""


def _columns(g: torch.Tensor, th: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``[∂(g·V[..., j])/∂θ]_j`` by one backward of the gradient's graph per column (``V``
    ``[D, k]``, or ``[R, D, k]`` for R members), written in place into one block of V's shape
    (no list of columns and no stack: a block less at the peak)."""
    out = torch.empty_like(V)
    for j in range(V.shape[-1]):
        (col,) = torch.autograd.grad(
            g, th, grad_outputs=V[..., j], retain_graph=True, allow_unused=True
        )
        # None: θ is not in the gradient's graph (a loss linear in θ after a convolution), H = 0
        out[..., j] = 0.0 if col is None else col
    return out
