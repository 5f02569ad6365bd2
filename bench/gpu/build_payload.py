"""Build the device payload: a trimmed vLLM wheel + the missing deps, in one
xz-compressed tar, split into <=55 MiB pieces, one piece per ignored folder.

usage: python3 build_payload.py VLLM_WHEEL DEPS_DIR WORK_DIR REPO_ROOT
  -> REPO_ROOT/.stage_a/payload.tar.xz.part_aa, .stage_b/...part_ab, ...

Trimmed from the vLLM 0.26.0 wheel (not needed on Hopper / for this model):
  vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so  (FA2; Hopper uses FA3)   290 MB
  vllm/vllm-rs                              (Rust frontend binary)    41 MB
  vllm/third_party/fmha_sm100/**            (Blackwell-only sources)  28 MB
  vllm/third_party/deep_gemm/_C.cpython-3{10,11,13,14}-*.so (other Pythons)
Entries are STORED (not deflated) so the outer xz compresses them well.
"""
import os
import re
import subprocess
import sys
import tarfile
import zipfile

whl, deps, work, repo = sys.argv[1:5]
os.makedirs(work, exist_ok=True)
DROP = [
    re.compile(r"^vllm/vllm_flash_attn/_vllm_fa2_C\.abi3\.so$"),
    re.compile(r"^vllm/vllm-rs$"),
    re.compile(r"^vllm/third_party/fmha_sm100/"),
    re.compile(r"^vllm/third_party/deep_gemm/_C\.cpython-3(10|11|13|14)-"),
]
out_whl = os.path.join(work, os.path.basename(whl))
zin = zipfile.ZipFile(whl)
dropped = 0
with zipfile.ZipFile(out_whl, "w", compression=zipfile.ZIP_STORED) as zout:
    for info in zin.infolist():
        name = info.filename
        if any(p.search(name) for p in DROP):
            dropped += info.file_size
            continue
        data = zin.read(name)
        if name.endswith(".dist-info/RECORD"):
            lines = [ln for ln in data.decode().splitlines()
                     if not any(p.search(ln.split(",")[0]) for p in DROP)]
            data = ("\n".join(lines) + "\n").encode()
        zi = zipfile.ZipInfo(name, date_time=info.date_time)
        zi.external_attr = info.external_attr
        zi.compress_type = zipfile.ZIP_STORED
        zout.writestr(zi, data)
print(f"trimmed wheel {os.path.getsize(out_whl)/2**20:.1f} MiB (dropped {dropped/2**20:.1f} MiB)")

tar_path = os.path.join(work, "payload.tar")
with tarfile.open(tar_path, "w") as t:
    t.add(out_whl, arcname=os.path.basename(out_whl))
    for f in sorted(os.listdir(deps)):
        if f.endswith(".whl"):
            t.add(os.path.join(deps, f), arcname=f)
subprocess.check_call(["xz", "-f", "-T2", "-9", tar_path])
xz = tar_path + ".xz"
print(f"payload.tar.xz {os.path.getsize(xz)/2**20:.1f} MiB")
for p in os.listdir(work):
    if p.startswith("payload.tar.xz.part_"):
        os.remove(os.path.join(work, p))
subprocess.check_call(["split", "-b", "55M", xz, os.path.join(work, "payload.tar.xz.part_")])
parts = sorted(p for p in os.listdir(work) if p.startswith("payload.tar.xz.part_"))
for i, p in enumerate(parts):
    d = os.path.join(repo, ".stage_" + "abcdefgh"[i])
    os.makedirs(d, exist_ok=True)
    for old in os.listdir(d):
        os.remove(os.path.join(d, old))
    os.replace(os.path.join(work, p), os.path.join(d, p))
    print(d, p, f"{os.path.getsize(os.path.join(d, p))/2**20:.1f} MiB")
subprocess.run(["sha256sum", xz])
