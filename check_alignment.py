"""Alignment check: is a device, a precision or the fused C++ ops numerically faithful to CPU fp32?

Runs N training steps of DINO or MAE twice from the same initial weights on the same batch: the reference on the CPU
in fp32 with the PyTorch ops, the candidate on --device at --precision with or without the fused ops of ema/ and
remap/. A step is the training loop's: forward (autocast), loss, backward (scaled in fp16), then AdamW, and for DINO
per-parameter clipping, the teacher EMA and the centre update. Each step is compared as it happens: the loss, then
every parameter's gradient (max abs difference, and the L2 norm of the difference relative to the reference's), and
at the end the weights. Identical settings give exactly 0; bf16 or fp16 give small differences that do not grow
from step to step on a faithful device.

    python check_alignment.py                                   # CPU bf16 autocast vs CPU fp32, seconds
    python check_alignment.py --precision fp32 --fused_ops on   # the fused ops vs the PyTorch fallbacks: all 0
    python check_alignment.py --device cuda --model mae --arch vit_base --img_size 224 --patch_size 16
"""
import argparse
import copy

import torch

from core import custom_ops
from core.device import autocast, make_grad_scaler, resolve_device, resolve_precision, step_boundary
from core.dino import DINOHead, DINOLoss, MultiCropWrapper, clip_gradients, ema_update
from core.errors import UserError, run_cli
from core.mae import build_mae, check_mask_ratio
from core.vision_transformer import ARCHS, build_vit

FUSED_OPS = {"dino": ("ema", "ema_update_"), "mae": ("remap", "gather_tokens")}  # folder and op each model uses


def get_args_parser():
    p = argparse.ArgumentParser("check_alignment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dino", choices=["dino", "mae"])
    p.add_argument("--arch", default="vit_tiny", choices=ARCHS)
    p.add_argument("--patch_size", default=8, type=int)
    p.add_argument("--img_size", default=32, type=int, help="Side of the images (DINO: of the global crops).")
    p.add_argument("--batch_size", default=4, type=int)
    p.add_argument("--steps", default=3, type=int)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "hpu"], help="Candidate device.")
    p.add_argument("--precision", default="bf16", choices=["auto", "fp32", "fp16", "bf16"],
                   help="Candidate precision (auto: the device's training default).")
    p.add_argument("--fused_ops", default="auto", choices=["auto", "on", "off"],
                   help="Candidate's C++ ops of ema/ and remap/: auto uses them where built, on requires them.")
    p.add_argument("--lr", default=1e-4, type=float, help="AdamW learning rate.")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--show", default=10, type=int, help="Parameters listed, largest relative gradient differences "
                                                         "first (0: all).")
    dino = p.add_argument_group("DINO")
    dino.add_argument("--out_dim", default=4096, type=int, help="Head output dimension (recipe: 65536).")
    dino.add_argument("--local_crops_number", default=2, type=int)
    dino.add_argument("--momentum_teacher", default=0.996, type=float)
    dino.add_argument("--clip_grad", default=3.0, type=float)
    mae = p.add_argument_group("MAE")
    mae.add_argument("--mask_ratio", default=0.75, type=float)
    return p


def build_nets(args):
    """Initial weights, shared by both runs; MAE gets a small decoder (64 wide, 2 blocks) to stay fast."""
    torch.manual_seed(args.seed)
    if args.model == "mae":
        check_mask_ratio(args.mask_ratio)
        return [build_mae(args.arch, args.patch_size, args.img_size, decoder_embed_dim=64, decoder_depth=2,
                          decoder_num_heads=4)]
    vit = build_vit(args.arch, args.patch_size, img_size=args.img_size)
    student = MultiCropWrapper(vit, DINOHead(vit.embed_dim, args.out_dim))
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    return [student, teacher]


def make_batch(args, device):
    """The same images (and MAE masking noise) for both runs, drawn on the CPU so every device sees equal values."""
    g = torch.Generator().manual_seed(args.seed + 1)
    if args.model == "mae":
        imgs = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g)
        noise = torch.rand(args.batch_size, (args.img_size // args.patch_size) ** 2, generator=g)
        return imgs.to(device), noise.to(device)
    local = max(args.patch_size, args.img_size // 2)
    sizes = [args.img_size] * 2 + [local] * args.local_crops_number
    return [torch.randn(args.batch_size, 3, s, s, generator=g).to(device) for s in sizes]


class Run:
    """One side of the comparison: the nets (DINO: student and teacher; MAE: the model), AdamW on the trained one,
    the grad scaler of the precision and the batch, all on one device."""

    def __init__(self, nets, args, device, precision, fused):
        self.nets = [copy.deepcopy(n).to(device) for n in nets]
        self.model = self.nets[0]
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=args.lr)
        self.scaler = make_grad_scaler(device, precision)
        self.batch = make_batch(args, device)
        if args.model == "dino":
            self.dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, 0.04, 0.04, 0, 1).to(device)
        self.args, self.device, self.precision, self.fused = args, device, precision, fused

    def loss(self):
        with autocast(self.device, self.precision):
            if self.args.model == "mae":
                imgs, noise = self.batch
                return self.model(imgs, self.args.mask_ratio, noise)[0].float()
            student, teacher = self.nets
            teacher_out, student_out = teacher(self.batch[:2]), student(self.batch)
        return self.dino_loss(student_out.float(), teacher_out.float(), 0)

    def step(self):
        """A training step; returns (loss, {name: gradient as fp32 on the CPU, before clipping})."""
        with custom_ops.use_fused(self.fused):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss()
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            step_boundary(self.device)
            grads = {n: p.grad.detach().float().cpu() for n, p in self.model.named_parameters() if p.grad is not None}
            if self.args.model == "dino":
                clip_gradients(self.model, self.args.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.args.model == "dino":
                ema_update(self.nets[1], self.model, self.args.momentum_teacher)
                self.dino_loss.update_center()
            step_boundary(self.device)
        return loss.item(), grads


def difference(a, b):
    """(max abs difference, L2 norm of the difference relative to b's)."""
    d = a.double() - b.double()
    max_abs, norm = d.abs().max().item(), b.double().norm().item()
    return max_abs, d.norm().item() / norm if norm else (0.0 if max_abs == 0 else float("inf"))


def main(args):
    """Prints the comparison; returns {losses: [(reference, candidate)] per step, grads: {parameter: (max abs,
    relative L2)} worst over the steps, weights: max abs difference at the end}."""
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    if args.img_size % args.patch_size:
        raise UserError(f"--img_size {args.img_size} is not a multiple of --patch_size {args.patch_size}")
    folder, op = FUSED_OPS[args.model]
    fused = args.fused_ops != "off" and custom_ops.has_fused(folder, op, device.type)
    if args.fused_ops == "on" and not fused:
        raise UserError(f"--fused_ops on but the {folder} op is not built for {device.type}: run make -C {folder} "
                        f"(or use --fused_ops auto)")
    nets = build_nets(args)
    ref = Run(nets, args, torch.device("cpu"), "fp32", fused=False)
    cand = Run(nets, args, device, precision, fused=fused)
    print(f"{args.model} {args.arch}/{args.patch_size} at {args.img_size} px, batch {args.batch_size}, "
          f"{args.steps} steps, AdamW lr {args.lr}")
    print(f"reference: cpu fp32, PyTorch ops | candidate: {device.type} {precision}, "
          f"{f'fused {folder} op' if fused else 'PyTorch ops'}")
    print(f"{'step':>4}{'loss ref':>14}{'loss cand':>14}{'abs diff':>11}{'grad max abs':>14}{'grad rel L2':>13}")
    losses, worst = [], {}
    for step in range(args.steps):
        ref_loss, ref_grads = ref.step()
        cand_loss, cand_grads = cand.step()
        if ref_grads.keys() != cand_grads.keys():
            raise UserError("the runs have different parameters with gradients: the candidate device dropped some")
        step_max, step_rel = 0.0, 0.0
        for name, g in ref_grads.items():
            max_abs, rel = difference(cand_grads[name], g)
            step_max, step_rel = max(step_max, max_abs), max(step_rel, rel)
            old = worst.get(name, (0.0, 0.0))
            worst[name] = (max(old[0], max_abs), max(old[1], rel))
        losses.append((ref_loss, cand_loss))
        print(f"{step:>4}{ref_loss:>14.7f}{cand_loss:>14.7f}{abs(cand_loss - ref_loss):>11.2e}{step_max:>14.2e}"
              f"{step_rel:>13.2e}")
    ranked = sorted(worst.items(), key=lambda kv: kv[1][1], reverse=True)
    shown = ranked if args.show == 0 else ranked[:args.show]
    print(f"\ngradient differences per parameter over the {args.steps} steps, largest relative first "
          f"({len(shown)} of {len(ranked)}):")
    print(f"{'parameter':<48}{'shape':>18}{'max abs':>11}{'rel L2':>11}")
    shapes = {n: tuple(p.shape) for n, p in ref.model.named_parameters()}
    for name, (max_abs, rel) in shown:
        print(f"{name:<48}{str(shapes[name]):>18}{max_abs:>11.2e}{rel:>11.2e}")
    weights = max((c.detach().float().cpu() - r.detach()).abs().max().item()
                  for ref_net, cand_net in zip(ref.nets, cand.nets)
                  for r, c in zip(ref_net.parameters(), cand_net.parameters()))
    print(f"\nweights after {args.steps} steps (all nets): max abs difference {weights:.2e}")
    return {"losses": losses, "grads": worst, "weights": weights}


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
