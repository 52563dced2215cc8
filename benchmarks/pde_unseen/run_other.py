import sys, time, torch, numpy as np
sys.path.insert(0, __import__('os').path.dirname(__file__))
from other import problem, fd_solve
import flowdiff as fd
torch.set_num_threads(1)
kw = eval(sys.argv[1]) if len(sys.argv) > 1 else {}
t = time.process_time()
m = fd.pde.RGNP(problem, **kw).fit(seed=0, verbose=True)
print('fit cpu', time.process_time() - t, m.history.get('calibration'))
z, w = problem.sample_params(100, torch.Generator().manual_seed(777))
mesh, u = fd_solve(z.numpy(), w.numpy())
x = torch.tensor(mesh[1:-1], dtype=torch.float32).reshape(1, -1, 1).expand(100, -1, 1)
mean, std = m.predict(z, w, x)
ut = torch.tensor(u[:, 1:-1], dtype=torch.float32)
rel = (mean - ut).norm(dim=1) / ut.norm(dim=1)
print('rel median %.4f mean %.4f' % (rel.median(), rel.mean()))
print('cov95', ((mean - ut).abs() <= 1.96 * std).float().mean().item())
m0, s0 = m.predict(z, w, x, calibrated=False)
print('cov95 raw', ((m0 - ut).abs() <= 1.96 * s0).float().mean().item())
m.save('/tmp/pde_other.pt')
