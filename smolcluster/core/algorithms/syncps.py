"""SyncPS: synchronous parameter server with backup-worker (straggler deadline) semantics.

Step s opens. Each worker pushes gradients for s. The server closes the step when every live
worker has pushed, or when `timeout` seconds have passed and at least `min_workers` contributions
arrived. It averages the gradients weighted by samples, clips, steps the optimizer once and bumps the
version. A push for a closed step is late: counted, discarded, and the sender is told the current
step and given the current weights. Workers take the server weights every `worker_update_interval`
steps, blended as polyak_alpha * server + (1 - polyak_alpha) * local. With `timeout: auto` the deadline
adapts to the recent arrival delays (deadline.py); every update records the deadline its step had.
"""

from __future__ import annotations

import math

import torch

from smolcluster.common.errors import BadField
from smolcluster.core.algorithms.base import Peer, ServerBase, WorkerBase
from smolcluster.core.algorithms.deadline import AdaptiveDeadline
from smolcluster.core.net import messages
from smolcluster.core.training.flat import fold_, scale_, total_norm
from smolcluster.core.net.wire import Message, MessageKind


class Server(ServerBase):
    algorithm = "syncps"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.cluster
        self.adaptive = AdaptiveDeadline(c.timeout_k, c.timeout_window, c.timeout_min, c.timeout_max) \
            if c.timeout == "auto" else None
        self.opened: dict[int, float] = {}  # step -> when it opened, for the delays of late pushes
        self.parked: set[int] = set()  # late ranks that start again with everyone when the open step closes

    def step_deadline(self) -> float:
        """Seconds a step that opens now waits for stragglers."""
        return self.adaptive.next_step() if self.adaptive else self.cluster.timeout

    def summary_fields(self) -> dict:
        c = self.cluster
        return {"deadline": self.adaptive.summary() if self.adaptive else {"mode": "fixed", "seconds": c.timeout}}

    def total_steps(self) -> int:
        total = self.nn.num_epochs * self.ctx.steps_per_epoch()
        return min(total, self.cluster.max_steps) if self.cluster.max_steps else total

    def loop(self) -> None:
        total = self.total_steps()
        # The step's sample-weighted gradient sum, folded as pushes arrive: straight into the model's gradient
        # buffer (no copy before the optimizer step), unless the server's own backward pass needs that buffer.
        self.grad_sum = self.flat.layout.empty(self.flat.grad.device) if self.cluster.server_trains else self.flat.grad
        self.grad_segments = self.flat.layout.segments(self.grad_sum)
        self.open_step()  # pushes for step 0 may arrive while we wait for the others
        if not self.wait_for_workers():
            self.stop_idle()
            self.log.warning(f"stopping before the first step: {self.stop_reason}")
            return
        self.opened_at = self.opened[self.step] = self.clock.monotonic()  # the first step opens once everyone is here
        self.deadline = self.opened_at + self.deadline_s
        while self.step < total:
            wait = self.deadline - self.clock.monotonic() if self.contribs else 0.5
            self.next_event(timeout=min(0.5, wait))
            if self.step_can_close():
                self.close_step()
                if self.step < total:
                    self.open_step()
            elif self.idle_too_long():
                self.stop_idle()
                self.log.warning(f"stopping early: {self.stop_reason}")
                return
        if self.cluster.max_steps and self.step >= self.cluster.max_steps:
            self.stop_reason = f"max_steps {self.cluster.max_steps} reached"  # as EDP says it

    def wait_for_workers(self) -> bool:
        """Start when every configured worker joined, or after idle_timeout with at least min_workers.
        False when workers joined and all of them left again for idle_timeout: nobody is coming."""
        t0 = self.clock.monotonic()
        while True:
            present = len(self.peers) + int(self.cluster.server_trains)
            if len(self.peers) == self.cluster.num_workers:
                return True
            if present >= self.cluster.min_workers and self.clock.monotonic() - t0 > self.cluster.idle_timeout:
                self.log.warning(f"starting with {len(self.peers)} of {self.cluster.num_workers} workers")
                return True
            if self.idle_too_long():
                return False
            self.next_event(timeout=0.2)

    def open_step(self) -> None:
        self.contribs: dict[int, tuple[int, float]] = {}  # rank -> (samples, loss); gradients are in grad_sum
        self.grad_sum.zero_()
        self.settled: set[int] = set()  # ranks whose push for this step was rejected: not waited for
        self.arrived: dict[int, float] = {}
        self.opened_at = self.opened[self.step] = self.clock.monotonic()
        self.opened.pop(self.step - 1000, None)
        self.deadline_s = self.step_deadline()
        self.deadline = self.opened_at + self.deadline_s
        if self.cluster.server_trains and not self.done_training_data():
            grads, samples, loss = self.own_gradients()
            self.fold(0, grads, samples, loss)

    def live_ranks(self) -> set[int]:
        return {r for r in self.peers if not self.stats[r].finished}

    def step_can_close(self) -> bool:
        if len(self.contribs) < self.cluster.min_workers:
            return False
        everyone = self.live_ranks() <= set(self.contribs) | self.settled
        return everyone or self.clock.monotonic() >= self.deadline

    def close_step(self) -> None:
        s = self.step
        total_samples = sum(n for n, _ in self.contribs.values())
        scale_(self.grad_segments, 1.0 / total_samples)  # the sum becomes the mean
        norms = self.apply_gradients(self.grad_sum)
        missing = sorted(self.live_ranks() - set(self.contribs))
        loss = sum(l * n for n, l in self.contribs.values()) / total_samples
        self.version += 1
        self.step += 1
        now = self.clock.monotonic()
        send_weights = self.step % self.cluster.worker_update_interval == 0
        for rank in self.contribs:
            self.count_applied(rank)
            peer = self.peers.get(rank)
            if peer is None:
                continue
            fields = {"step": s, "next_step": self.step, "version": self.version, "held_s": now - self.arrived.get(rank, now)}
            peer.send(self.weights_for(peer, MessageKind.STEP_DONE, fields) if send_weights else Message(MessageKind.STEP_DONE, fields))
        for rank in sorted(self.parked):  # the late ones, up to date at the same moment as the others
            if rank in self.peers:
                self._reply_current(self.peers[rank], "late")
        self.parked.clear()
        self.after_update(contributors=sorted(self.contribs), missing=missing, loss=loss,
                          step_time_s=now - self.opened_at, grad_norms=norms, deadline_s=round(self.deadline_s, 6),
                          arrival_s={r: round(t - self.opened_at, 6) for r, t in self.arrived.items()})
        self.ctx.wandb.log({"train/loss": loss, "step_time_s": now - self.opened_at, "contributors": len(self.contribs),
                            **{f"grad_norm/{k}": v for k, v in norms.items()}}, step=self.version)

    def on_join(self, peer: Peer) -> None:
        pass  # the joiner got the current step in WELCOME; it is live from now on

    def on_push(self, peer: Peer, push: messages.Push, msg: Message) -> None:
        st = self.stats[peer.rank]
        st.reported_steps = push.worker_step
        try:
            if push.step is None:
                raise BadField("PUSH", "step", "is missing (a SyncPS push names the step it is for)")
            # worker_step counts exchanges, retried steps included: a loose bound
            self.check_push(push, max_samples=self.nn.batch_size, max_worker_step=4 * self.max_worker_step)
            grads = self.decode_push(msg)  # complete and well-formed before any reply carries weights
        except BadField as e:
            return self._rejected(peer, e.reason, e.problem, weights=False)
        if push.step < self.step:
            self.observe_arrival(push.step)
            self.count_late(peer.rank, "its step had closed", step=push.step)
            if len(self.contribs) >= self.cluster.min_workers and peer.rank not in self.contribs:
                # The open step can close without it, and joining it mid-way would make it late again (and
                # again): it waits for the step to close and starts the next one with everyone.
                self.parked.add(peer.rank)
                self.settled.add(peer.rank)
                return None
            return self._reply_current(peer, "late")
        if push.step > self.step or peer.rank in self.contribs:
            return self._rejected(peer, "wrong-step", f"push for step {push.step} while step {self.step} is open")
        size = total_norm(self.flat.layout.segments(grads))
        problem = self.robust_problem(peer.rank, size, weights_mode=False)
        if problem == "non-finite":
            return self._rejected(peer, problem, "gradients contain NaN or Inf")
        if problem:
            return self._rejected(peer, "outlier", problem)
        if self.robust is not None:
            self.robust.accept(peer.rank, size)
        self.fold(peer.rank, grads, push.samples, push.loss if push.loss is not None else math.nan)
        now = self.clock.monotonic()
        self.arrived[peer.rank] = now
        self.observe_arrival(push.step)
        st.record_push(push.samples, staleness=self.version - push.base_version, now=now)

    def fold(self, rank: int, grads: torch.Tensor, samples: int, loss: float) -> None:
        """Add a contribution to the step's weighted sum now (its buffer may be reused for the next frame)."""
        fold_(self.grad_segments, self.flat.layout.segments(grads), float(samples))
        self.contribs[rank] = (samples, loss)

    def observe_arrival(self, step: int) -> None:
        """A push for `step` (open or closed) arrived now: its delay feeds the adaptive deadline."""
        if self.adaptive and step in self.opened:
            self.adaptive.observe(self.clock.monotonic() - self.opened[step])

    def _rejected(self, peer: Peer, reason: str, detail: str, weights: bool = True) -> None:
        self.reject(peer.rank, reason, detail)
        self.reply_rejected(peer, detail, weights)

    def reply_rejected(self, peer: Peer, reason: str, weights: bool = False) -> None:
        """A rejected push costs its sender its turn: the open step no longer waits for it (it may still push
        for it again), so a peer sending bad pushes cannot hold every step up to the straggler deadline."""
        if peer.rank not in self.contribs:
            self.settled.add(peer.rank)
        self._reply_current(peer, "rejected", reason, weights=weights)

    def _reply_current(self, peer: Peer, status: str, reason: str = "", weights: bool = True) -> None:
        """Bring a late or rejected sender up to date: the open step and (a complete push earns them) the weights."""
        fields = {"status": status, "reason": reason[:200], "next_step": self.step, "version": self.version}
        peer.send(self.weights_for(peer, MessageKind.ACK, fields) if weights else Message(MessageKind.ACK, fields))


class Worker(WorkerBase):
    algorithm = "syncps"

    def meanwhile(self, next_step: int) -> None:
        """While the server averages: the local step, unless its result is sure to be thrown away (the
        server weights replace the local ones after every step: polyak_alpha 1, worker_update_interval 1,
        the defaults), then the next batch."""
        if not (self.nn.polyak_alpha >= 1.0 and self.cluster.worker_update_interval == 1):
            self.local_step()
        self.prefetch(next_step)

    def train(self, welcome: Message) -> None:
        step = messages.parse(MessageKind.WELCOME, welcome.fields).step
        alpha = self.nn.polyak_alpha
        deadline = self.cluster.timeout_max if self.cluster.timeout == "auto" else self.cluster.timeout
        reply_timeout = deadline + self.ctx.transport.io_timeout
        while step < self.total_steps:
            loss, samples = self.compute_gradients(step)
            grads = self.gradients()  # unclipped: the server clips the average, as one big batch would
            push = Message(MessageKind.PUSH, {"step": step, "base_version": self.version, "samples": samples,
                                              "loss": loss, "worker_step": self.steps_done + 1}, flat=grads, layout=self.flat.layout)
            # while the server averages: local progress between syncs (replaced or blended when weights
            # arrive) and the next batch
            reply, typed = self.exchange(push, timeout=reply_timeout, meanwhile=lambda: self.meanwhile(step + 1))
            self.steps_done += 1
            self.samples_done += samples
            if isinstance(typed, messages.StepDone):
                status = "applied"
            elif isinstance(typed, messages.Ack) and typed.next_step is not None:
                status = typed.status
            else:
                raise BadField(reply.kind.name, "next_step", "a push's reply must name the next step")
            # late or rejected: jump to the open step with the server's weights, whatever the blend
            self.load_weights(reply, alpha=alpha if reply.kind == MessageKind.STEP_DONE else 1.0)
            self.version = typed.version
            self.record(step, loss, status=status)
            step = typed.next_step
