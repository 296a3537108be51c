"""Forward passes in onnxruntime: cached sessions per set of requested outputs, batching, and the
measured best batch size.

The engine knows nothing about explanation methods: it maps an input batch to named output arrays.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Iterable, Iterator, Sequence

import numpy as np
import onnx

from .. import cache
from .graph import infer_shapes
from .providers import _quiet_session

BATCH_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)
MAX_CACHED_SESSIONS = 4


class OrtEngine:
    def __init__(self, model: onnx.ModelProto, input_name: str, providers: Sequence[str],
                 model_key: str):
        self.model = model
        self.input_name = input_name
        self.providers = list(providers)
        self.model_key = model_key
        self._sessions: "OrderedDict[tuple[str, ...], object]" = OrderedDict()
        self._types: dict | None = None
        self.default_outputs = tuple(o.name for o in model.graph.output)

    # sessions -------------------------------------------------------------------------------------
    def _session_options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        return options

    def session(self, outputs: Sequence[str] = ()):
        """A session whose graph outputs include ``outputs`` (cached, least recently used dropped)."""
        extra = tuple(o for o in dict.fromkeys(outputs) if o not in self.default_outputs)
        if extra in self._sessions:
            self._sessions.move_to_end(extra)
            return self._sessions[extra]
        model = self.model
        if extra:
            if self._types is None:
                self._types = infer_shapes(self.model)
            model = onnx.ModelProto()
            model.CopyFrom(self.model)
            for name in extra:
                vi = self._types.get(name)
                elem = vi.type.tensor_type.elem_type if vi is not None else onnx.TensorProto.FLOAT
                model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem or 1, None))
        import onnxruntime as ort

        data = model.SerializeToString()
        if "CUDAExecutionProvider" in self.providers:
            sess = _quiet_session(data, self.providers)
        else:
            sess = ort.InferenceSession(data, self._session_options(), providers=self.providers)
        self._sessions[extra] = sess
        while len(self._sessions) > MAX_CACHED_SESSIONS:
            self._sessions.popitem(last=False)
        return sess

    @property
    def active_providers(self) -> list[str]:
        return self.session().get_providers()

    # running --------------------------------------------------------------------------------------
    def run(self, batch: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """One forward pass of the whole ``batch``."""
        return self.session(outputs).run(list(outputs), {self.input_name: batch})

    def run_batched(self, inputs: np.ndarray, outputs: Sequence[str], batch_size: int) -> list[np.ndarray]:
        """Forward ``inputs`` in chunks of ``batch_size`` and concatenate."""
        parts = [self.run(inputs[i:i + batch_size], outputs) for i in range(0, len(inputs), batch_size)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]

    def stream(self, batches: Iterable[np.ndarray], outputs: Sequence[str]) -> Iterator[list[np.ndarray]]:
        """Forward each batch a generator yields; batches are made lazily so memory stays bounded."""
        session = self.session(outputs)
        for batch in batches:
            yield session.run(list(outputs), {self.input_name: batch})

    # batch size -----------------------------------------------------------------------------------
    def best_batch_size(self, example: np.ndarray, outputs: Sequence[str]) -> int:
        """The batch size with the highest measured throughput, measured once per model, device and
        machine and cached in ``cache_dir()/batch_sizes.json``."""
        key = f"{self.model_key}|{','.join(self.providers)}|{os.cpu_count()}"
        known = cache.read_json("batch_sizes.json").get(key)
        if isinstance(known, int) and known >= 1:
            return known
        best, best_rate, worse = 1, 0.0, 0
        for size in BATCH_CANDIDATES:
            batch = np.repeat(example[None], size, axis=0)
            self.run(batch, outputs)  # warm-up (allocations, kernel choice)
            elapsed, runs = 0.0, 0
            while elapsed < 0.2 or runs < 2:
                start = time.perf_counter()
                self.run(batch, outputs)
                elapsed += time.perf_counter() - start
                runs += 1
            rate = size * runs / elapsed
            if rate > best_rate * 1.05:
                best, best_rate, worse = size, rate, 0
            else:
                worse += 1
                if worse >= 2:
                    break
        cache.update_json("batch_sizes.json", key, best)
        return best
