"""Train the toy model in its own process (for kill and torchrun tests).

usage: toy_train.py RUN_DIR STEPS [--resume] [--deterministic] [--slow-save] [--ckpt-every N] [--batch B]
--slow-save pauses between the two weight files of every checkpoint write and prints SAVING, so a test
can SIGKILL the process while a checkpoint is half written.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from toy import ToyConfig, ToyData, ToyModel  # noqa: E402

import spheregen.checkpoint as ckpt  # noqa: E402
from spheregen.config import to_dict  # noqa: E402
from spheregen.engine import dist  # noqa: E402
from spheregen.engine.trainer import TrainConfig, Trainer  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("steps", type=int)
p.add_argument("--resume", action="store_true")
p.add_argument("--deterministic", action="store_true")
p.add_argument("--slow-save", action="store_true")
p.add_argument("--ckpt-every", type=int, default=50)
p.add_argument("--batch", type=int, default=16)
p.add_argument("--step-sleep", type=float, default=0.0)
p.add_argument("--fsdp", action="store_true")
p.add_argument("--until", type=int)
args = p.parse_args()

if args.slow_save:
    real_save_file = ckpt.save_file

    def slow_save_file(tensors, filename):
        real_save_file(tensors, filename)
        if filename.endswith("model.safetensors"):
            print("SAVING", flush=True)
            time.sleep(0.5)

    ckpt.save_file = slow_save_file

torch.manual_seed(123)
cfg_model = ToyConfig(noise=0.0 if args.deterministic else 0.1)
model = ToyModel(cfg_model)
if args.deterministic:
    model.net[2].p = 0.0
if args.step_sleep:
    real_loss = model.training_loss

    def sleepy_loss(batch, step):
        time.sleep(args.step_sleep)
        return real_loss(batch, step)

    model.training_loss = sleepy_loss
cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=3e-3, warmup_steps=10, weight_decay=0.05,
                  ema_decay=0.9, flip=True, log_every=10, ckpt_every=args.ckpt_every, seed=5, fsdp=args.fsdp)
trainer = Trainer(model, ToyData(), cfg, args.run_dir, config_dict={"model": to_dict(cfg_model)}, progress=False)
if args.resume:
    trainer.resume()
trainer.fit(until=args.until)
dist.shutdown()
print("FINISHED", flush=True)
