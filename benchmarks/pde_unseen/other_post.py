import sys, time, torch, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from other import problem
import flowdiff as fd
from flowdiff.pde.reference import thomas, interp_linear
torch.set_num_threads(1)

def batched_solve(z, w, nodes=201, iters=40):
    z = np.asarray(z, float); w = np.asarray(w, float)
    x = np.linspace(0, 2, nodes); h = x[1] - x[0]; xm = 0.5 * (x[1:] + x[:-1])
    b = z.shape[0]
    u = w[:, :1] * (2 - x) / 2
    for _ in range(iters):
        um = 0.5 * (u[:, 1:] + u[:, :-1])
        e = np.exp(z[:, :1] * um)
        k = e + z[:, 1:2] * xm**2
        dk = z[:, :1] * e
        du = (u[:, 1:] - u[:, :-1]) / h
        flux = k * du
        ui = u[:, 1:-1]
        res = -(flux[:, 1:] - flux[:, :-1]) / h + z[:, 2:3] * ui**3 - w[:, 1:2] * (1 + x[1:-1])
        dl = 0.5 * dk * du - k / h
        dr = 0.5 * dk * du + k / h
        diag = -(dl[:, 1:] - dr[:, :-1]) / h + 3 * z[:, 2:3] * ui**2
        upper = -dr[:, 1:] / h
        lower = dl[:, :-1] / h
        step = thomas(lower, diag, upper, -res)
        u[:, 1:-1] += step
        if np.abs(step).max() < 1e-10:
            break
    return x, u

def solver(z, w, x):
    mesh, u = batched_solve(z.double().numpy(), w.double().numpy())
    return torch.as_tensor(interp_linear(mesh, u, x.double().numpy()[..., 0]))

if __name__ == "__main__":
    cases = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    m = fd.pde.RGNP.load('/tmp/pde_other.pt', problem)
    g = torch.Generator().manual_seed(2024)
    z, w = problem.sample_params(cases, g)
    x = problem.uniform_points(cases, 16, g, margin=0.05)
    clean = solver(z, w, x).float()
    noise = 0.02
    y = clean + noise * torch.randn(clean.shape, generator=g)
    print('u scale', clean.abs().max(1).values.median().item())
    t = time.process_time()
    zs = m.posterior(x, y, w, noise=noise, n=256, generator=torch.Generator().manual_seed(1))
    print('surrogate cpu', time.process_time() - t, m.last_posterior)
    t = time.process_time()
    gs, info = fd.pde.gold_posterior(problem, x, y, w, noise, n=256, generator=torch.Generator().manual_seed(2), solver=solver, prior_draws=2048)
    print('gold cpu', time.process_time() - t, info)
    gs = gs.float()
    for name, s in (('surrogate', zs), ('gold', gs)):
        mean = s.mean(0)
        lo, hi = s.quantile(0.05, 0), s.quantile(0.95, 0)
        print(name, 'rmse %.4f' % (mean - z).pow(2).mean().sqrt(), 'cov90 %.3f' % ((z >= lo) & (z <= hi)).float().mean())
    print('mean dist / gold std', ((zs.mean(0) - gs.mean(0)).abs() / gs.std(0)).median().item(), 'std ratio', (zs.std(0) / gs.std(0)).median().item())
