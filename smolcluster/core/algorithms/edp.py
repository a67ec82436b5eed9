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

import time

import torch

from smolcluster.core.algorithms.base import Peer, ServerBase, WorkerBase
from smolcluster.core.training.optim import all_finite, tensor_norms
from smolcluster.core.training.quantization import quantize_state
from smolcluster.core.net.wire import Message, MessageKind


class Server(ServerBase):
    algorithm = "edp"

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
                self.stop_reason = self.idle_stop_reason()
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
        self.after_update(source=0, staleness=0, loss=loss, grad_norms=norms)

    def on_push(self, peer: Peer, msg: Message) -> None:
        f, st = msg.fields, self.stats[peer.rank]
        base = f.get("base_version")
        if not isinstance(base, int) or base > self.version or base < 0:
            self.reject(peer.rank, "bad-version", f"base_version {base!r} with server at {self.version}")
            return self._ack(peer, "rejected", f, tau=0)
        try:
            tensors = self.decode_push(msg)
        except (ValueError, KeyError) as e:
            self.reject(peer.rank, "bad-tensors", str(e))
            return self._ack(peer, "rejected", f, tau=0)
        norms = tensor_norms(tensors)
        if not all_finite(norms):
            self.reject(peer.rank, "non-finite", f"{f.get('mode', 'weights')} contain NaN or Inf")
            return self._ack(peer, "rejected", f, tau=0)
        tau = self.version - base
        if f.get("mode") == "gradients":
            norms = self.apply_gradients(tensors, lr_scale=1.0 / (1 + tau), norms=norms)
        else:
            alpha = 1.0 / (1 + tau)
            with torch.no_grad():
                for name, w in self.model.state_dict().items():
                    w.add_(tensors[name].to(w.device, w.dtype) - w, alpha=alpha)
            norms = {}  # weights, not gradients: nothing to report as gradient norms
        self.version += 1
        self.step = self.version
        samples = int(f.get("samples", 0))
        st.record_push(samples, tau, time.time())
        st.reported_steps = int(f.get("worker_step", st.reported_steps))
        self.worker_progress[str(peer.rank)] = st.reported_steps
        self.after_update(source=peer.rank, staleness=tau, loss=f.get("loss"), grad_norms=norms)
        self.ctx.wandb.log({"staleness": tau, f"train/loss_rank{peer.rank}": f.get("loss"),
                            **{f"grad_norm/{k}": v for k, v in norms.items()}}, step=self.version)
        self._ack(peer, "applied", f, tau)

    def on_pull(self, peer: Peer, msg: Message) -> None:
        self.worker_progress[str(peer.rank)] = int(msg.fields.get("worker_step", self.worker_progress.get(str(peer.rank), 0)))
        super().on_pull(peer, msg)

    def _ack(self, peer: Peer, status: str, f: dict, tau: int) -> None:
        fields = {"status": status, "version": self.version, "tau": tau,
                  "finished": bool(self.cluster.max_steps and self.version >= self.cluster.max_steps)}
        if f.get("want_weights"):
            peer.send(self.weights_message(MessageKind.ACK, fields))
        else:
            peer.send(Message(MessageKind.ACK, fields))


class Worker(WorkerBase):
    algorithm = "edp"

    def train(self, welcome: Message) -> None:
        step = int(welcome.fields.get("worker_step", 0))  # a restarted worker resumes its data position
        push_every, pull_every = self.cluster.push_interval, self.cluster.worker_update_interval
        grad_mode = self.cluster.push_mode == "gradients"
        grad_sum: dict[str, torch.Tensor] = {}
        since_push = 0
        reply_timeout = self.ctx.transport.io_timeout
        loss = float("nan")
        while step < self.total_steps:
            loss, samples = self.compute_gradients(step)
            if grad_mode:
                for n, p in self.model.named_parameters():
                    grad_sum[n] = grad_sum[n] + p.grad if n in grad_sum else p.grad.detach().clone()
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
                reply = self.exchange(push, timeout=reply_timeout)
                grad_sum, since_push = {}, 0
                self.record(step, loss, status=reply.fields.get("status"), tau=reply.fields.get("tau"))
                if reply.fields.get("finished"):
                    return
            elif want_weights:
                reply = self.exchange(Message(MessageKind.PULL, {"worker_step": step}), timeout=reply_timeout)
                self.record(step, loss, status="pulled")
            else:
                continue
            if want_weights:
                self.load_weights(reply, alpha=self.nn.polyak_alpha)  # 1.0 (default): take the server's weights

    def push_message(self, step: int, loss: float, samples: int, grad_sum: dict[str, torch.Tensor],
                     steps: int, want_weights: bool) -> Message:
        if self.cluster.push_mode == "gradients":
            tensors = {k: v / max(1, steps) for k, v in grad_sum.items()}  # mean gradient since the last push
        else:
            tensors = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        quant: dict[str, dict] = {}
        if self.cluster.use_quantization:
            tensors, quant = quantize_state(tensors)
        fields = {"base_version": self.version, "worker_step": step, "samples": samples, "loss": loss,
                  "mode": self.cluster.push_mode, "want_weights": want_weights}
        return Message(MessageKind.PUSH, fields, tensors=tensors, quant=quant)
