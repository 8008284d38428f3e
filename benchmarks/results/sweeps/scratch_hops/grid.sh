export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1
for st in band3_256_d32_s1 band3_256_d32_s2 sparse3_256_d32_s0 sparse3_256_d32_s1 sparse3_256_d32_s2; do
  for kind in "plain 0" "noise 0.05"; do python3 hop.py /tmp/proto/start_$st.pt 6 $kind >> hops256.log 2>&1; done
done
for st in band3_256_d32_s0 band3_256_d32_s1 sparse3_256_d32_s0 sparse3_256_d32_s1; do
  for kind in "noise 0.02" "noise 0.1"; do python3 hop.py /tmp/proto/start_$st.pt 6 $kind >> hops256.log 2>&1; done
done
