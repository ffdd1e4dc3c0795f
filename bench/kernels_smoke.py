"""Quick GPU smoke check of every kernel path with default configs (no tuning): rel err vs float64."""
import os

os.environ["SPEAR_AUTOTUNE"] = "0"
import torch  # noqa: E402

from spear_compile.lowering import dispatch  # noqa: E402
from spear_compile.quant.packing import pack  # noqa: E402


def main():
    dev = "cuda"
    for (k, n, group, dtype) in ((2048, 512, 128, torch.bfloat16), (4096, 4096, 4096, torch.float16), (11008, 4096, 128, torch.bfloat16)):
        codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.uint8)
        s = (torch.rand(n, k // group, device=dev) * 0.01 + 0.002).to(dtype)
        z = torch.randint(0, 16, (n, k // group), device=dev).to(dtype)
        r = 32
        A, B = (torch.randn(r, k, device=dev) * 0.02).to(dtype), (torch.randn(n, r, device=dev) * 0.02).to(dtype)
        gw, gb = (torch.randn(r, r, device=dev) * 0.3).to(dtype), (torch.randn(r, device=dev) * 0.1).to(dtype)
        bias = torch.randn(n, device=dev).to(dtype)
        w = ((codes.double().reshape(n, -1, group) - z.double()[..., None]) * s.double()[..., None]).reshape(n, k)
        for m in (1, 3, 16, 64, 300):
            x = torch.randn(m, k, device=dev).to(dtype)
            u = x.double() @ A.double().T
            ref = x.double() @ w.T + bias.double() + (u * 2 * torch.sigmoid(u @ gw.double().T + gb.double())) @ B.double().T
            cfgs = [None] if m > 16 else [None, dispatch.DecodeConfig(32, min(128, group), 1, 4), dispatch.DecodeConfig(64, min(256, group), 8, 8)]
            if m > 16:
                cfgs.append(dispatch.DequantCublasConfig())
            for cfg in cfgs:
                for rep in range(2):
                    y = dispatch.launch(x, pack(codes, 4), s, z, bias, group, A, B, gw, gb, config=cfg)
                    err = ((y.double() - ref).norm() / ref.norm()).item()
                    print(f"K={k} N={n} g={group} {dtype} M={m} {cfg.name if cfg else dispatch.choose(m, k, n, group, dtype, r, True)} rep{rep}: {err:.2e}")
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
