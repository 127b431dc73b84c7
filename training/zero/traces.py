"""ZeRO-3 prefetching for a routed model: one recorded module trace per kind of model call.

ZeRO-3 records the order in which modules run between two calls of the model (a forward and whatever
backward follows before the next call) and, once that order repeats, gathers the parameters of the next
modules while the current one computes. A skill model runs other modules for every task (and
under data-local skill parallelism for every combination of the positions' tasks), so DeepSpeed's single
trace breaks whenever the task changes and it rarely prefetches. The route is known before every call, so
`TraceSwitch` keeps one trace per key (the task, or the positions' tasks) and hands DeepSpeed the right
one before each call.

This reaches into DeepSpeed internals (`DeepSpeedZeRoOffload.param_coordinator` and the settings of
`PartitionedParameterCoordinator`); tested with DeepSpeed 0.19.
"""

from __future__ import annotations


class TraceSwitch:
    """`select(key)` before every model call; `per_call=False` keeps DeepSpeed's single trace (to compare)."""

    def __init__(self, engine, per_call: bool = True):
        self.offload = getattr(engine.optimizer, "parameter_offload", None)  # ZeRO-3 only
        self.per_call = per_call
        self.coordinators: dict = {}
        self.current = None
        self.calls = self.traced = 0
        """Model calls, and those that ran along a complete trace (so ZeRO-3 prefetched)."""

    def select(self, key) -> None:
        """Make the trace of `key` DeepSpeed's for the coming model call."""
        if self.offload is None:
            return
        self._count()
        key = key if self.per_call else None
        coordinator = self.coordinators.get(key)
        if coordinator is None:
            first = not self.coordinators
            coordinator = self.offload.param_coordinator if first else self._new_coordinator()
            self.coordinators[key] = coordinator
        self.offload.param_coordinator = self.current = coordinator

    def _count(self) -> None:
        """After a call: its trace is complete if it was at the call's start (DeepSpeed promotes a recorded
        trace then) and the call followed it (a deviation invalidates it)."""
        if self.current is not None:
            self.calls += 1
            self.traced += self.current.is_complete_trace()
            self.current = None

    def take(self) -> tuple[int, int]:
        """(model calls, calls along a complete trace) since the last take."""
        self._count()
        counts, self.calls, self.traced = (self.calls, self.traced), 0, 0
        return counts

    def _new_coordinator(self):
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

        offload, template = self.offload, self.offload.param_coordinator
        return PartitionedParameterCoordinator(
            prefetch_bucket_sz=offload._prefetch_bucket_sz,
            max_reuse_distance_in_numel=offload._max_reuse_distance_in_numel,
            max_available_parameters_in_numel=offload._max_available_parameters_in_numel,
            allgather_stream=offload._DeepSpeedZeRoOffload__allgather_stream,
            inflight_param_registry=offload._DeepSpeedZeRoOffload__inflight_param_registry,
            prefetch_nvme=offload.offload_device == OffloadDeviceEnum.nvme,
            timers=offload.timers,
            zero_quantized_weights=template.zero_quantized_weights,
            zero_quantized_nontrainable_weights=template.zero_quantized_nontrainable_weights,
            fast_sharding_for_leaf_module=template.fast_sharding_for_leaf_module,
            log_trace_cache_warnings=template._PartitionedParameterCoordinator__log_trace_cache_warnings,
        )
