"""The op contract of docs/design.md §2 as one set of tests that every op's test file instantiates,
the way torchvision's ``RoIOpTester`` serves its RoI ops::

    class TestRoIAlignContract(DifferentiableOpContract):
        op = "roi_align"
        grad_inputs = (0,)
        def make_inputs(self, variant): ...      # the arguments of call()
        def call(self, input, boxes, *params): return fops.roi_align(input, boxes, *params)
        def reference(self, input, boxes, *params): ...
        ...

Each test runs once per backend of ``backends`` (``fastdiffinst.ops.use_backend(op, backend)``):

* ``test_opcheck``: ``torch.library.opcheck`` of the registered ops with the arguments the public
  function gives them (:meth:`OpContract.opcheck_cases`), with and without ``requires_grad`` for a
  differentiable op;
* ``test_compile_matches_eager``: ``torch.compile(fullgraph=True, backend="aot_eager")`` against
  eager, outputs and gradients bitwise;
* ``test_no_unwritten_outputs``: fresh outputs poisoned (NaN, bools True;
  :func:`utils.deterministic_with_nan_fill`) under deterministic algorithms: none of it left in the
  outputs and gradients, a second run bitwise equal, and the oracle matched (floats at the
  tolerance of their dtype against a float64 oracle, docs/design.md §6; the rest exactly);
* ``test_empty``: zero instances give the oracle's shapes, dtypes and values, and zero gradients;
* ``test_gradcheck`` / ``test_gradgradcheck`` (:class:`DifferentiableOpContract`): float64 on small
  inputs; every test needs at least one case (a subclass without one opts out: ``test_gradgradcheck =
  None``).

The inputs are whatever tuple ``call`` takes; ``grad_inputs`` are the positions of the
differentiable ones (a position may hold a list of tensors, as the levels of a feature pyramid).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

import fastdiffinst.ops as fops
from utils import assert_close_to_f64, deterministic_with_nan_fill, nan_count

Inputs = tuple[Any, ...]
GRAD_SEED = 12345


def _outputs(out: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class OpContract:
    """The contract of an op without autograd; see the module docstring for the tests and hooks."""

    op: str                                   # the op's name for use_backend
    backends: tuple[Any, ...] = ("cpp",)      # names or pytest.param(name, marks=...)
    variants: tuple[str, ...] = ("default",)  # cases of test_no_unwritten_outputs (make_inputs)
    compile_variants: tuple[str, ...] = ("default",)  # cases of test_compile_matches_eager (make_inputs)
    empty_variants: tuple[str, ...] = ("empty",)      # cases of test_empty (make_empty_inputs)
    grad_inputs: tuple[int, ...] = ()         # positions of the differentiable inputs

    # -- hooks --------------------------------------------------------------------------------------

    def make_inputs(self, variant: str) -> Inputs:
        """The arguments of :meth:`call` for the named case."""
        raise NotImplementedError

    def make_empty_inputs(self, variant: str) -> Inputs:
        """The arguments of :meth:`call` for the named case with zero instances."""
        raise NotImplementedError

    def call(self, *inputs: Any) -> Tensor | tuple[Tensor, ...]:
        """The public function under test."""
        raise NotImplementedError

    def reference(self, *inputs: Any) -> Tensor | tuple[Tensor, ...]:
        """The oracle on the same arguments; the differentiable ones come as float64 leaves, and
        floating-point outputs must be float64 (test_empty passes the inputs unchanged)."""
        raise NotImplementedError

    def opcheck_cases(self, backend: str, requires_grad: bool) -> list[tuple[Callable, tuple]]:
        """``(registered op, arguments)`` pairs for ``torch.library.opcheck``."""
        raise NotImplementedError

    def output_reduce_len(self, inputs: Inputs) -> int:
        """The reduction length behind each output element (widens atol, docs/design.md §6)."""
        return 1

    def grad_reduce_lens(self, inputs: Inputs) -> Sequence[int]:
        """The reduction length behind each gradient element, per differentiable tensor."""
        return [1] * len(self._leaves(inputs))

    # -- machinery ----------------------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc) -> None:
        """Parametrizes the contract tests by backend and by the cases the subclass names. A contract
        test without cases is an error, not an empty parameter set: a subclass that means to skip
        one opts out explicitly (``test_gradgradcheck = None``)."""
        test = metafunc.function.__name__
        params = {"backend": self.backends, "requires_grad": (False, True) if self.grad_inputs else (False,),
                  "variant": {"test_compile_matches_eager": self.compile_variants,
                              "test_empty": self.empty_variants}.get(test, self.variants),
                  "gradcheck_case": getattr(self, "gradcheck_cases", ()),
                  "gradgradcheck_case": getattr(self, "gradgradcheck_cases", ())}
        for name, values in params.items():
            if name in metafunc.fixturenames:
                if not values:
                    raise ValueError(f"{type(self).__name__}.{test} has no cases ({name}): name them, or opt out "
                                     f"with `{test} = None`")
                metafunc.parametrize(name, values)

    @contextlib.contextmanager
    def using(self, backend: str) -> Iterator[None]:
        with fops.use_backend(self.op, backend):
            yield

    def _leaves(self, inputs: Inputs) -> list[Tensor]:
        """The differentiable tensors of ``inputs``, lists flattened."""
        return [t for i in self.grad_inputs
                for t in (inputs[i] if isinstance(inputs[i], (list, tuple)) else [inputs[i]])]

    def _with_leaves(self, inputs: Inputs, leaves: Sequence[Tensor]) -> Inputs:
        """``inputs`` with its differentiable tensors replaced by ``leaves`` (in order)."""
        rebuilt, queue = list(inputs), iter(leaves)
        for i in self.grad_inputs:
            rebuilt[i] = [next(queue) for _ in inputs[i]] if isinstance(inputs[i], (list, tuple)) else next(queue)
        return tuple(rebuilt)

    def evaluate(self, fn: Callable, inputs: Inputs, dtype: torch.dtype | None = None,
                 rounding: Sequence[torch.dtype] | None = None) -> tuple[tuple, tuple]:
        """``(outputs, gradients)`` of ``fn(*inputs)``: the differentiable inputs become fresh leaves
        (of ``dtype`` when given), and the gradients are those of ``Σ out·g`` over the outputs that
        require grad, ``g`` seeded random numbers rounded to the output's dtype, or to ``rounding``
        (one dtype per such output: a float64 oracle sees the values the op saw)."""
        leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in self._leaves(inputs)]
        outs = _outputs(fn(*self._with_leaves(inputs, leaves)))
        if not leaves:
            return outs, ()
        generator = torch.Generator().manual_seed(GRAD_SEED)
        differentiable = [o for o in outs if o.requires_grad]
        rounding = rounding or [o.dtype for o in differentiable]
        upstream = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(r).to(o)
                    for o, r in zip(differentiable, rounding, strict=True)]
        grads = torch.autograd.grad(differentiable, leaves, upstream)
        return tuple(o.detach() for o in outs), grads

    def assert_matches_reference(self, inputs: Inputs, outs: tuple, grads: tuple) -> None:
        rounding = [o.dtype for o in outs if o.is_floating_point()] if grads else None
        expected_outs, expected_grads = self.evaluate(self.reference, inputs, torch.float64, rounding)
        assert len(outs) == len(expected_outs)
        for index, (actual, expected) in enumerate(zip(outs, expected_outs)):
            if actual.is_floating_point():
                assert_close_to_f64(actual, expected, self.output_reduce_len(inputs), msg=f"output {index}")
            else:
                assert actual.dtype == expected.dtype and torch.equal(actual, expected), f"output {index}"
        for index, (actual, expected, length) in enumerate(zip(grads, expected_grads, self.grad_reduce_lens(inputs))):
            assert_close_to_f64(actual, expected, length, msg=f"gradient {index}")

    # -- tests --------------------------------------------------------------------------------------

    def test_opcheck(self, backend, requires_grad):
        cases = self.opcheck_cases(backend, requires_grad)
        assert cases, "no registered op to check"
        for op, args in cases:
            torch.library.opcheck(op, args)

    def test_compile_matches_eager(self, backend, variant):
        torch._dynamo.reset()
        inputs = self.make_inputs(variant)
        compiled = torch.compile(self.call, fullgraph=True, backend="aot_eager")
        with self.using(backend):
            eager_outs, eager_grads = self.evaluate(self.call, inputs)
            compiled_outs, compiled_grads = self.evaluate(compiled, inputs)
        for compiled_tensor, eager_tensor in zip(compiled_outs + compiled_grads, eager_outs + eager_grads, strict=True):
            torch.testing.assert_close(compiled_tensor, eager_tensor, rtol=0, atol=0)

    def test_no_unwritten_outputs(self, backend, variant):
        inputs = self.make_inputs(variant)
        with self.using(backend), deterministic_with_nan_fill():
            outs, grads = self.evaluate(self.call, inputs)
            again_outs, again_grads = self.evaluate(self.call, inputs)
        floating = [t for t in outs + grads if t.is_floating_point()]
        assert nan_count(*floating) == 0
        for first, second in zip(outs + grads, again_outs + again_grads, strict=True):
            assert torch.equal(first, second), "two runs differ"
        self.assert_matches_reference(inputs, outs, grads)

    def test_empty(self, backend, variant):
        inputs = self.make_empty_inputs(variant)
        with self.using(backend), deterministic_with_nan_fill():
            outs, grads = self.evaluate(self.call, inputs)
        expected = _outputs(self.reference(*inputs))
        assert [(o.shape, o.dtype) for o in outs] == [(e.shape, e.dtype) for e in expected]
        assert any(o.numel() == 0 for o in outs)
        # The values too: an output that is not empty (the per-image counts of ddim_step_boxes) is
        # written, and is the oracle's.
        for index, (actual, oracle) in enumerate(zip(outs, expected)):
            assert torch.equal(actual, oracle), f"output {index}: {actual} is not the oracle's {oracle}"
        for grad, leaf in zip(grads, self._leaves(inputs), strict=True):
            assert grad.shape == leaf.shape and grad.dtype == leaf.dtype
            assert torch.count_nonzero(grad) == 0 and nan_count(grad) == 0


class DifferentiableOpContract(OpContract):
    """The contract of an op with autograd: :class:`OpContract` plus gradcheck and gradgradcheck."""

    gradcheck_cases: tuple[str, ...] = ()      # cases of test_gradcheck (make_gradcheck_inputs)
    gradgradcheck_cases: tuple[str, ...] = ()  # cases of test_gradgradcheck (make_gradcheck_inputs)

    def make_gradcheck_inputs(self, case: str) -> Inputs:
        """Small float64 arguments of :meth:`call` for the named case."""
        raise NotImplementedError

    def gradcheck_fast_mode(self, backend: str) -> bool:
        return False

    def _check(self, check: Callable, backend: str, case: str) -> None:
        inputs = self.make_gradcheck_inputs(case)
        leaves = tuple(t.detach().requires_grad_() for t in self._leaves(inputs))
        assert leaves and all(t.dtype == torch.float64 for t in leaves)

        def fn(*tensors):
            return self.call(*self._with_leaves(inputs, tensors))

        with self.using(backend):
            assert check(fn, leaves, fast_mode=self.gradcheck_fast_mode(backend))

    def test_gradcheck(self, backend, gradcheck_case):
        self._check(torch.autograd.gradcheck, backend, gradcheck_case)

    def test_gradgradcheck(self, backend, gradgradcheck_case):
        self._check(torch.autograd.gradgradcheck, backend, gradgradcheck_case)
