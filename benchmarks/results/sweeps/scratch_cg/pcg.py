import torch
from sparsefit import als

def _hv(m, c, x):
    # bd(M · blockdiag(x) · C): x (h,2,2)
    h = x.shape[0]
    n = m.shape[0]; mv = m.view(n, h, 2); mx = torch.empty(n, h, 2, dtype=m.dtype)
    torch.mul(mv[:, :, 0:1], x[None, :, 0, :], out=mx); mx.addcmul_(mv[:, :, 1:2], x[None, :, 1, :])
    return torch.bmm(mx.view(h, 2, n), c.view(h, 2, n).transpose(1, 2))
    return torch.einsum("brk,bck->brc", mx.reshape(h, 2, -1), c.reshape(h, 2, -1))

def make_solve(iters):
    def solve(q, c, u, b_old):
        h = b_old.shape[0]
        m = q.t() @ q
        rhs = torch.einsum("obr,obc->brc", q.reshape(q.shape[0], h, 2), u.reshape(u.shape[0], h, 2))
        mb = m.reshape(h, 2, h, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (h,2,2)
        cb = c.reshape(h, 2, h, 2).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        pre = (mb[:, :, None, :, None] * cb[:, None, :, None, :]).reshape(h, 4, 4)
        lam = als.DAMPING * float(pre.diagonal(dim1=1, dim2=2).mean()) + 1e-300
        pre = pre + lam * torch.eye(4, dtype=pre.dtype)
        lam_pre = 1e-6 * pre.diagonal(dim1=1, dim2=2).mean(dim=1)
        pinv = torch.linalg.inv(pre + lam_pre[:, None, None] * torch.eye(4, dtype=pre.dtype))
        x = b_old.clone()
        A = lambda v: _hv(m, c, v) + lam * v
        r = rhs + lam * b_old - A(x)
        z = torch.einsum("bij,bj->bi", pinv, r.reshape(h, 4)).reshape(h, 2, 2)
        p = z.clone(); rz = float((r * z).sum())
        for _ in range(iters):
            ap = A(p)
            pap = float((p * ap).sum())
            if pap <= 0: break
            al = rz / pap
            x += al * p; r -= al * ap
            z = torch.einsum("bij,bj->bi", pinv, r.reshape(h, 4)).reshape(h, 2, 2)
            rz2 = float((r * z).sum())
            p = z + (rz2 / rz) * p; rz = rz2
        return x
    return solve
