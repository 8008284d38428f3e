import time, torch
from sparsefit.kernels.hessian import hessian_product, hessian_product_reference
torch.set_num_threads(2)
for n in (6, 34, 2048):
    h=n//2
    g=torch.randn(n,n,dtype=torch.float64); m=g@g.t(); c=(g.t()@g)
    x=torch.randn(h,2,2,dtype=torch.float64)
    a=hessian_product(m,c,x); b=hessian_product_reference(m,c,x)
    print(n, float((a-b).abs().max()/b.abs().max()))
def tm(f):
    f(m,c,x); ts=[]
    for _ in range(15):
        t=time.perf_counter(); f(m,c,x); ts.append(time.perf_counter()-t)
    return min(ts)*1e3, sorted(ts)[7]*1e3
print('ref',tm(hessian_product_reference)); print('numba',tm(hessian_product))
