"""EDP: elastic, asynchronous data parallelism with staleness-aware folding.

Workers train continuously with a local optimizer, push their weights (or gradients) every
`push_interval` steps tagged with the server version they last pulled, and pull fresh weights every
`worker_update_interval` steps. The server folds each push in as it arrives, scaled by staleness
tau = server_version - base_version:
  weights:    w <- w + a(tau) * (w_worker - w),  a(tau) = 1 / (1 + tau)
  gradients:  one optimizer step at learning rate lr / (1 + tau)
Workers join and leave at any time; a joiner gets the current weights first.
"""

from __future__ import annotations

import math

import torch

from smolcluster.common.errors import BadField
from smolcluster.core.algorithms.base import Peer, ServerBase, WorkerBase
from smolcluster.core.net import messages
from smolcluster.core.training.flat import fold_, layer_norms, scale_, total_norm
from smolcluster.core.training.optim import norm_of
from smolcluster.core.training.robust import MovementLedger
from smolcluster.core.net.wire import Message, MessageKind


class Server(ServerBase):
    algorithm = "edp"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.moved = MovementLedger()  # for judging stale weights pushes by the worker's own progress

    def loop(self) -> None:
        while True:
            training = self.cluster.server_trains and not self.done_training_data()
            self.next_event(timeout=0.0 if training else 0.5)
            if training and self.events.empty():
                self.train_own_step()
            if self.cluster.max_steps and self.version >= self.cluster.max_steps:
                self.stop_reason = f"max_steps {self.cluster.max_steps} reached"
                return
            if self.all_finished() and not training:
                return
            if self.idle_too_long():
                self.stop_idle()
                self.log.warning(f"stopping: {self.stop_reason}; unfinished: "
                                 f"{[s.hostname for s in self.stats.values() if not s.finished]}")
                return

    def all_finished(self) -> bool:
        return all(s.finished for s in self.stats.values())

    def train_own_step(self) -> None:
        grads, samples, loss = self.own_gradients()
        norms = self.apply_gradients(grads)
        self.version += 1
        self.step = self.version
        self.moved.record(self.version, 0.0)  # an optimizer step's movement is not measured
        self.after_update(source=0, staleness=0, loss=loss, grad_norms=norms)

    def on_push(self, peer: Peer, push: messages.Push, msg: Message) -> None:
        st = self.stats[peer.rank]
        try:
            self.check_push(push, max_samples=self.nn.batch_size * self.cluster.push_interval,
                            max_worker_step=self.max_worker_step)  # worker_step is its data position
            tensors = self.decode_push(msg)
        except BadField as e:
            self.reject(peer.rank, e.reason, e.problem)
            return self._ack(peer, "rejected", None, tau=0)
        weights_mode = push.mode != "gradients"
        layout = self.flat.layout
        if weights_mode:  # the update is the step from our weights to the worker's, one op per dtype segment
            update = [s.to(w.device, w.dtype) - w for w, s in zip(self.flat.weights(), layout.segments(tensors))]
            size = total_norm(update)
        else:
            norms = layer_norms(layout, tensors)
            size = norm_of(norms)
        tau = self.version - push.base_version
        # A weights push differs from our weights by everyone's progress since its base as well as its own:
        # judge only what the worker itself can have done, so an honest straggler is no outlier. (The history
        # keeps the plain norms: the lower bound of a stale push would drag the median towards 0. A liar that
        # claims an old base to widen the bound gets damped by the same staleness: what it can move the model
        # stays within the bar plus the average movement per version since.)
        own = max(0.0, size - self.moved.since(push.base_version)) if weights_mode and math.isfinite(size) else size
        problem = self.robust_problem(peer.rank, own, weights_mode)
        if problem:
            reason = "non-finite" if problem == "non-finite" else "outlier"
            detail = f"{push.mode} contain NaN or Inf" if reason == "non-finite" else problem
            self.reject(peer.rank, reason, detail)
            return self._ack(peer, "rejected", push, tau=0)
        if self.robust is not None:
            self.robust.accept(peer.rank, size)
        if weights_mode:
            alpha = 1.0 / (1 + tau)
            with torch.no_grad():
                fold_(self.flat.weights(), update, alpha)
            # the worker's own per-layer gradient norms, from before its local step
            norms = dict(push.grad_norms) if self.nn.track_gradients else {}
        else:
            norms = self.apply_gradients(tensors, lr_scale=1.0 / (1 + tau), norms=norms)
        self.version += 1
        self.step = self.version
        self.moved.record(self.version, size / (1 + tau) if weights_mode else 0.0)
        self.count_applied(peer.rank)
        st.record_push(push.samples, tau, self.clock.monotonic())
        st.reported_steps = push.worker_step
        self.worker_progress[str(peer.rank)] = st.reported_steps
        self.after_update(source=peer.rank, staleness=tau, loss=push.loss, grad_norms=norms)
        self.ctx.wandb.log({"staleness": tau, f"train/loss_rank{peer.rank}": push.loss,
                            **{f"grad_norm/{k}": v for k, v in norms.items()}}, step=self.version)
        self._ack(peer, "applied", push, tau)

    def on_pull(self, peer: Peer, pull: messages.Pull) -> None:
        self.worker_progress[str(peer.rank)] = pull.worker_step
        super().on_pull(peer, pull)

    def reply_rejected(self, peer: Peer, reason: str) -> None:
        self._ack(peer, "rejected", None, tau=0)

    def _ack(self, peer: Peer, status: str, push: messages.Push | None, tau: int) -> None:
        """The push's outcome; with the current weights when the worker asked at its pull cadence."""
        fields = {"status": status, "version": self.version, "tau": tau,
                  "finished": bool(self.cluster.max_steps and self.version >= self.cluster.max_steps)}
        if push is not None and push.want_weights and self.pull_due(peer, push.worker_step):
            peer.send(self.weights_for(peer, MessageKind.ACK, fields))
        else:
            peer.send(Message(MessageKind.ACK, fields))


class Worker(WorkerBase):
    algorithm = "edp"

    def train(self, welcome: Message) -> None:
        step = messages.parse(MessageKind.WELCOME, welcome.fields).worker_step  # a restarted worker resumes its data position
        push_every, pull_every = self.cluster.push_interval, self.cluster.worker_update_interval
        grad_mode = self.cluster.push_mode == "gradients"
        grad_sum: torch.Tensor | None = None  # flat: the gradients since the last push
        since_push = 0
        reply_timeout = self.ctx.transport.io_timeout
        loss = float("nan")
        while step < self.total_steps:
            loss, samples = self.compute_gradients(step)
            if grad_mode:
                if grad_sum is None:
                    grad_sum = self.flat.grad.clone()
                else:
                    fold_(self.flat.layout.segments(grad_sum), self.flat.grads(), 1.0)
            want_weights = (step + 1) % pull_every == 0
            pushing = (step + 1) % push_every == 0 or step + 1 == self.total_steps
            # A local step whose result the pull is about to overwrite (and no pushed weights carry) is wasted.
            if not (want_weights and self.nn.polyak_alpha >= 1.0 and (grad_mode or not pushing)):
                self.local_step()
            step += 1
            since_push += 1
            self.steps_done += 1
            self.samples_done += samples
            if pushing:
                push = self.push_message(step, loss, samples * since_push, grad_sum, since_push, want_weights)
                reply, ack = self.exchange(push, timeout=reply_timeout)
                if not isinstance(ack, messages.Ack):
                    raise BadField(reply.kind.name, "kind", "expected ACK for a push")
                grad_sum, since_push = None, 0
                self.record(step, loss, status=ack.status, tau=ack.tau)
                if ack.finished:
                    return
                version = ack.version
            elif want_weights:
                reply, weights = self.exchange(Message(MessageKind.PULL, {"worker_step": step}), timeout=reply_timeout)
                if not isinstance(weights, messages.Weights):
                    raise BadField(reply.kind.name, "kind", "expected WEIGHTS for a pull")
                self.record(step, loss, status="pulled")
                version = weights.version
            else:
                continue
            if want_weights:  # 1.0 (default): take the server's weights
                self.load_weights(reply, alpha=self.nn.polyak_alpha, version=version)

    def push_message(self, step: int, loss: float, samples: int, grad_sum: torch.Tensor | None,
                     steps: int, want_weights: bool) -> Message:
        layout = self.flat.layout
        if self.cluster.push_mode == "gradients":
            assert grad_sum is not None
            scale_(layout.segments(grad_sum), 1.0 / max(1, steps))  # mean gradient since the last push
            flat = grad_sum.cpu()
        else:
            flat = self.flat.snapshot()
        if self.quantized is not None:
            flat, layout = self.quantized.quantize(flat), self.quantized
        fields = {"base_version": self.version, "worker_step": step, "samples": samples, "loss": loss,
                  "mode": self.cluster.push_mode, "want_weights": want_weights}
        if self.cluster.push_mode == "weights" and self.nn.track_gradients and self.grad_norms:
            fields["grad_norms"] = self.grad_norms  # the server sees weights only: tell it the gradient norms
        return Message(MessageKind.PUSH, fields, flat=flat, layout=layout)
