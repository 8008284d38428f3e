import time, torch

def _bd(b, z):  # blockdiag(b) @ z, z (n, cols)
    h = b.shape[0]
    return torch.einsum("hrc,hcx->hrx", b, z.reshape(h, 2, -1)).reshape(2 * h, -1)

def _bdt(b, z):
    h = b.shape[0]
    return torch.einsum("hcr,hcx->hrx", b, z.reshape(h, 2, -1)).reshape(2 * h, -1)

class Model:
    def __init__(self, perms, out, k):
        self.perms = perms; self.out = out; self.k = k
        self.inv = torch.argsort(perms, dim=1)
        self.n = perms.shape[1]
    def forward(self, theta, save=True):
        n, k = self.n, self.k
        z = torch.zeros(n, k, dtype=theta.dtype); z[:k] = torch.eye(k, dtype=theta.dtype)
        ys = []
        for j in range(theta.shape[0]):
            y = z[self.perms[j]]
            if save: ys.append(y)
            z = _bd(theta[j], y)
        return z[:self.out], ys
    def jv(self, theta, ys, v):
        t = torch.zeros_like(ys[0])
        for j in range(theta.shape[0]):
            t = _bd(theta[j], t[self.perms[j]]) + _bd(v[j], ys[j])
        return t[:self.out]
    def jtu(self, theta, ys, u):
        h = theta.shape[1]
        w = torch.zeros(self.n, u.shape[1], dtype=u.dtype); w[:self.out] = u
        g = torch.empty_like(theta)
        for j in range(theta.shape[0] - 1, -1, -1):
            g[j] = torch.einsum("hrx,hcx->hrc", w.reshape(h, 2, -1), ys[j].reshape(h, 2, -1))
            w = _bdt(theta[j], w)[self.inv[j]]
        return g

def gn_lm(blocks, perms, a, iters, cg_iters=50, time_limit=None, log=None, lam0=1e-4):
    out, k = a.shape
    m = Model(perms, out, k)
    theta = blocks.clone()
    t0 = time.perf_counter()
    G, ys = m.forward(theta)
    r = G - a
    L = float((r * r).sum())
    hist = [(0, L / out, 0.0)]
    lam = None
    for it in range(iters):
        g = m.jtu(theta, ys, r)
        if lam is None:
            lam = lam0 * float((g*g).sum())**0.5  # crude scale
        d = torch.zeros_like(theta)
        res = -g.clone(); p = res.clone(); rr = float((res * res).sum()); rr0 = rr
        for c in range(cg_iters):
            jp = m.jv(theta, ys, p)
            hp = m.jtu(theta, ys, jp) + lam * p
            alpha = rr / float((p * hp).sum())
            d += alpha * p
            res -= alpha * hp
            rr_new = float((res * res).sum())
            if rr_new < 1e-12 * rr0: break
            p = res + (rr_new / rr) * p; rr = rr_new
        jd = m.jv(theta, ys, d)
        pred = -(float((g * d).sum()) + 0.5 * float((jd * jd).sum()))
        Gn, ysn = m.forward(theta + d)
        rn = Gn - a
        Lnew = float((rn * rn).sum())
        rho = 0.5 * (L - Lnew) / pred if pred > 0 else -1
        if rho > 0:
            theta = theta + d; L = Lnew; ys = ysn; r = rn
        if rho > 0.75: lam /= 3
        elif rho < 0.25: lam *= 4
        el = time.perf_counter() - t0
        hist.append((it + 1, L / out, el))
        if log: print(f"it {it+1} loss {L/out:.6g} lam {lam:.3g} rho {rho:.3f} cg {c+1} t {el:.1f}", file=log, flush=True)
        if time_limit and el > time_limit: break
    return theta, hist
