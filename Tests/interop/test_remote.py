"""Reading checkpoints from URLs (https://, gs://, hf://) against a local server that serves
byte ranges, redirects Hub-style, and injects faults (scripts/range_server.py). No test
touches the internet: every scheme is pointed at the local server through the ecosystem's own
variables (HF_ENDPOINT, STORAGE_EMULATOR_HOST)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.numpy import save_file

from conftest import BIN, tool
from range_server import RangeServer


@pytest.fixture()
def server(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    srv = RangeServer(str(root)).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def env_for(srv, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "GOOGLE_OAUTH_ACCESS_TOKEN", "CKPT_GCS_TOKEN")}
    env.update(HF_ENDPOINT=srv.url, STORAGE_EMULATOR_HOST=srv.url, PATH=BIN + os.pathsep + os.environ["PATH"])
    env.update(extra)
    return env


def convert(srv, url, out, *args, **extra_env):
    """ckpt-read URL | ckpt-write OUT; the status is the first failing stage's (pipefail would
    give the last one's: ckpt-write's 65 for a stream cut short)."""
    cmd = (f"ckpt-read {' '.join(args)} '{url}' | ckpt-write --force '{out}'; "
           "s=(${PIPESTATUS[@]}); exit $(( s[0] ? s[0] : s[1] ))")
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_for(srv, **extra_env))


def read(srv, url, *args, **extra_env):
    return subprocess.run([tool("ckpt-read"), *args, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_for(srv, **extra_env))


def publish(srv, local, relative):
    target = os.path.join(srv.root, relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(local, target)
    return target


@pytest.mark.parametrize("scheme", ["https", "gs", "hf"])
def test_real_model_from_every_scheme_is_byte_identical(server, minilm, tmp_path, scheme):
    url = {"https": f"{server.url}/files/model.safetensors", "gs": "gs://bucket/minilm/model.safetensors",
           "hf": "hf://sentence-transformers/all-MiniLM-L6-v2"}[scheme]
    path = {"https": "files/model.safetensors", "gs": "bucket/minilm/model.safetensors",
            "hf": "sentence-transformers/all-MiniLM-L6-v2/model.safetensors"}[scheme]
    publish(server, minilm, path)
    out = tmp_path / "out.safetensors"
    p = convert(server, url, out)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == open(minilm, "rb").read()
    # Each byte fetched about once: the file, plus at most the first request's 64 KiB.
    size = os.path.getsize(minilm)
    assert size <= server.stats.bytes["/" + path] <= size + (64 << 10)


def test_hub_token_goes_to_the_hub_and_not_to_the_redirect_target(server, minilm, tmp_path):
    publish(server, minilm, "org/private/model.safetensors")
    p = convert(server, "hf://org/private/model.safetensors@v1.0", tmp_path / "o.safetensors", HF_TOKEN="hf_secret")
    assert p.returncode == 0, p.stderr
    resolves = [r for r in server.stats.requests if "/resolve/" in r[0]]
    cdn = [r for r in server.stats.requests if "/resolve/" not in r[0]]
    assert resolves and cdn
    assert all(r[2] == "Bearer hf_secret" and r[3].startswith("127.0.0.1") for r in resolves)
    assert all(r[2] is None and r[3].startswith("localhost") for r in cdn)
    assert all(r[0] == "/org/private/resolve/v1.0/model.safetensors" for r in resolves)
    assert b"hf_secret" not in p.stderr


def test_sharded_hub_repo_through_its_index(server, tmp_path):
    torch.manual_seed(0)
    state = {f"layers.{i}.weight": torch.randn(256, 512) for i in range(8)}
    repo = tmp_path / "root" / "org" / "sharded"
    repo.mkdir(parents=True)
    save_torch_state_dict(state, str(repo), max_shard_size="1MB")
    assert len([n for n in os.listdir(repo) if n.endswith(".safetensors")]) > 2
    local = tmp_path / "local.safetensors"
    remote = tmp_path / "remote.safetensors"
    assert subprocess.run(["bash", "-o", "pipefail", "-c", f"ckpt-read {repo} | ckpt-write {local}"], env=env_for(server)).returncode == 0
    p = convert(server, "hf://org/sharded", remote)
    assert p.returncode == 0, p.stderr
    assert remote.read_bytes() == local.read_bytes()
    listed = read(server, "hf://org/sharded/model.safetensors.index.json", "--list")
    assert listed.returncode == 0 and listed.stdout.count(b"layers.") == 8


def test_torch_zip_and_npz_by_position(server, tmp_path):
    torch.manual_seed(1)
    sd = {"a.weight": torch.randn(300, 200), "b.bias": torch.arange(7, dtype=torch.int64), "c": torch.randn(64, 64).to(torch.bfloat16)}
    os.makedirs(server.root + "/w")
    torch.save(sd, server.root + "/w/model.pt")
    np.savez(server.root + "/w/arrays.npz", x=np.arange(1000, dtype=np.float32).reshape(10, 100), y=np.ones((3, 3), np.int16))
    for name in ["model.pt", "arrays.npz"]:
        local, remote = tmp_path / f"l-{name}.safetensors", tmp_path / f"r-{name}.safetensors"
        assert subprocess.run(["bash", "-o", "pipefail", "-c", f"ckpt-read {server.root}/w/{name} | ckpt-write {local}"], env=env_for(server)).returncode == 0
        p = convert(server, f"{server.url}/w/{name}", remote)
        assert p.returncode == 0, p.stderr
        assert remote.read_bytes() == local.read_bytes()


def big_file(server, mib):
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": rng.standard_normal((1 << 18,), dtype=np.float32) for i in range(mib)}  # 1 MiB each
    path = server.root + "/big/model.safetensors"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path)
    return path


def test_cut_connections_and_5xx_are_resumed(server, tmp_path):
    path = big_file(server, 40)
    server.faults.cut["/big/model.safetensors"] = [3 << 20, 3]  # three replies cut after 3 MiB
    server.faults.status["/big/model.safetensors"] = [503, 1, 0]  # then a 503 (Retry-After: 0)
    out = tmp_path / "o.safetensors"
    p = convert(server, f"{server.url}/big/model.safetensors", out)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == open(path, "rb").read()
    size = os.path.getsize(path)
    assert size <= server.stats.bytes["/big/model.safetensors"] <= size + (64 << 10)
    assert server.faults.cut["/big/model.safetensors"][1] == 0 and server.faults.status["/big/model.safetensors"][1] == 0


def test_not_found_is_exit_66_naming_the_url(server):
    p = read(server, f"{server.url}/nothing/model.safetensors")
    assert p.returncode == 66
    assert f"{server.url}/nothing/model.safetensors" in p.stderr.decode() and "404" in p.stderr.decode()
    p = read(server, "hf://org/missing")
    assert p.returncode == 66 and "hf://org/missing@main" in p.stderr.decode()


def test_missing_or_wrong_credential_is_exit_77_naming_it(server, minilm):
    publish(server, minilm, "private/m/model.safetensors")
    server.faults.require_token = ("/private/", "ya29.token")
    p = read(server, "gs://private/m/model.safetensors", "--list")
    assert p.returncode == 77 and "GOOGLE_OAUTH_ACCESS_TOKEN" in p.stderr.decode()
    p = read(server, "gs://private/m/model.safetensors", "--list", CKPT_GCS_TOKEN="wrong")
    assert p.returncode == 77 and "CKPT_GCS_TOKEN" in p.stderr.decode() and "wrong" not in p.stderr.decode()
    p = read(server, "gs://private/m/model.safetensors", "--list", CKPT_GCS_TOKEN="ya29.token")
    assert p.returncode == 0 and p.stdout.count(b"\n") > 100


def test_an_object_changed_mid_read_is_an_error(server, tmp_path):
    big_file(server, 40)
    server.faults.change_after["/big/model.safetensors"] = 2
    out = tmp_path / "o.safetensors"
    p = convert(server, f"{server.url}/big/model.safetensors", out)
    assert p.returncode == 74, p.stderr
    assert b"changed while it was being read" in p.stderr
    assert not out.exists()


def test_a_wrong_content_range_is_an_error(server, tmp_path):
    big_file(server, 20)
    server.faults.wrong_range.add("/big/model.safetensors")
    p = read(server, f"{server.url}/big/model.safetensors")
    assert p.returncode == 74 and b"Content-Range" in p.stderr


@pytest.mark.parametrize("claimed", [1 << 45, 1 << 62])
def test_a_server_claiming_a_huge_file_gets_an_error_not_an_allocation(server, tmp_path, claimed):
    big_file(server, 4)
    server.faults.claim_total["/big/model.safetensors"] = claimed
    rc, peak_kib, err = peak_rss(server, f"{server.url}/big/model.safetensors")
    assert rc == 74, err
    assert peak_kib < 64 << 10, f"peak RSS {peak_kib >> 10} MiB"


def peak_rss(srv, *args):
    """Runs ckpt-read ARGS (output discarded) under a fresh parent whose only child it is, so
    RUSAGE_CHILDREN is its peak: (exit status, peak RSS in KiB, stderr)."""
    probe = ("import resource, subprocess, sys\n"
             "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
             "sys.stderr.buffer.write(p.stderr)\n"
             "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    p = subprocess.run(["python3", "-c", probe, tool("ckpt-read"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env_for(srv))
    rc, peak_kib = map(int, p.stdout.split())
    return rc, peak_kib, p.stderr


def test_a_copy_holds_a_bounded_window_not_the_file(server, tmp_path):
    big_file(server, 400)
    rc, peak_kib, err = peak_rss(server, f"{server.url}/big/model.safetensors")
    assert rc == 0, err
    assert 8 << 10 < peak_kib < 128 << 10, f"peak RSS {peak_kib >> 10} MiB"
    # Out of file order (--first: the last tensors, then the rest from the start): what was
    # read behind the release point is given back too.
    rc, peak_kib, err = peak_rss(server, "--first", "t39*", f"{server.url}/big/model.safetensors")
    assert rc == 0, err
    assert peak_kib < 128 << 10, f"peak RSS {peak_kib >> 10} MiB with --first"


def test_many_small_zip_members_do_not_each_take_a_huge_page(server, tmp_path):
    """Opening a torch zip reads every member's local header (scattered 64 KiB pages): they must
    not be backed by 2 MiB pages each."""
    os.makedirs(server.root + "/many")
    torch.save({f"w{i}": torch.full((4096,), float(i)) for i in range(400)}, server.root + "/many/model.pt")
    rc, peak_kib, err = peak_rss(server, "--list", f"{server.url}/many/model.pt")
    assert rc == 0, err
    assert peak_kib < 96 << 10, f"peak RSS {peak_kib >> 10} MiB"


ORBAX = os.path.join(os.path.dirname(__file__), "..", "fixtures", "orbax")
ORBAX_CASES = ["a_standard", "b_pytree", "c_no_ocdbt", "h_zarr3", "i_nocompress", "j_sharded", "k_dotkey",
               "hand/ocdbt_multichunk", "hand/zarr_plain"]


def stream_tensors(data):
    import io
    import ckpt_stream as cs
    return {t.name: (t.dtype, tuple(t.shape), t.data) for t in cs.StreamReader(io.BytesIO(data))}


@pytest.mark.parametrize("case", ORBAX_CASES)
def test_orbax_from_a_bucket_equals_the_local_read(case, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(os.path.join(ORBAX, case), root / "bucket" / "ck")
    srv = RangeServer(str(root)).start()
    try:
        local = subprocess.run([tool("ckpt-read"), str(root / "bucket" / "ck")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert local.returncode == 0, local.stderr
        remote = read(srv, "gs://bucket/ck")
        assert remote.returncode == 0, remote.stderr
        assert stream_tensors(remote.stdout) == stream_tensors(local.stdout)
        # The manifest names every data file: nothing is listed, and each file is read about once.
        served = srv.stats.total_bytes()
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        assert served <= on_disk, (served, on_disk)
    finally:
        srv.shutdown()
        srv.server_close()


def test_orbax_manager_root_needs_the_step_over_a_url(server):
    shutil.copytree(os.path.join(ORBAX, "e_manager"), os.path.join(server.root, "b", "run"))
    p = read(server, "gs://b/run", "--list")
    assert p.returncode == 66 and b"give --step N" in p.stderr
    local = subprocess.run([tool("ckpt-read"), "--step", "0", os.path.join(server.root, "b", "run")], stdout=subprocess.PIPE)
    p = read(server, "gs://b/run", "--step", "0")
    assert p.returncode == 0, p.stderr
    assert stream_tensors(p.stdout) == stream_tensors(local.stdout)


def test_without_libcurl_a_url_is_exit_69_and_files_still_work(server, minilm):
    p = read(server, f"{server.url}/x.safetensors", CKPT_LIBCURL="/nonexistent/libcurl.so.4")
    assert p.returncode == 69 and b"CKPT_LIBCURL=/nonexistent/libcurl.so.4 cannot be loaded" in p.stderr
    p = read(server, minilm, "--list", CKPT_LIBCURL="/nonexistent/libcurl.so.4")
    assert p.returncode == 0


def test_progress_counts_the_bytes_fetched(server, tmp_path):
    big_file(server, 8)
    p = read(server, f"{server.url}/big/model.safetensors", "--progress")
    assert p.returncode == 0, p.stderr
    last = p.stderr.decode().split("\r")[-1]
    assert "8.0 MiB fetched" in last and "8 tensors" in last, last


def test_proxies_come_from_the_environment(server, minilm, tmp_path):
    """libcurl's proxy variables: a second server stands in for the proxy (a forward proxy gets
    the absolute URL in the request line; this one serves the path from its own folder). The
    origin host does not resolve: only the proxy can answer."""
    os.makedirs(tmp_path / "proxyroot")
    proxy = RangeServer(str(tmp_path / "proxyroot")).start()
    try:
        shutil.copyfile(minilm, tmp_path / "proxyroot" / "m.safetensors")
        url = "http://weights.invalid/m.safetensors"
        p = read(server, url, "--list", http_proxy=proxy.url)
        assert p.returncode == 0, p.stderr
        assert p.stdout.count(b"\n") > 100 and proxy.stats.requests
        p = read(server, url, "--list", http_proxy=proxy.url, no_proxy="weights.invalid")
        assert p.returncode == 74 and b"weights.invalid" in p.stderr  # direct: the host does not resolve
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_a_query_is_kept_for_the_request_and_hidden_in_messages(server, minilm, tmp_path):
    """A presigned URL: the query goes to the server, never to stderr."""
    publish(server, minilm, "signed/model.safetensors")
    out = tmp_path / "o.safetensors"
    p = convert(server, f"{server.url}/signed/model.safetensors?X-Goog-Signature=SECRET123", out)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == open(minilm, "rb").read()
    assert any(r[0] == "/signed/model.safetensors" for r in server.stats.requests)
    p = read(server, f"http://user:pw@127.0.0.1:{server.server_address[1]}/signed/missing.safetensors?X-Goog-Signature=SECRET123")
    assert p.returncode == 66, p.stderr
    assert b"SECRET123" not in p.stderr and b"pw@" not in p.stderr and b"missing.safetensors?\xe2\x80\xa6" in p.stderr


def test_a_malformed_retry_after_waits_a_while_instead_of_failing(server, tmp_path):
    big_file(server, 2)
    server.faults.status["/big/model.safetensors"] = [503, 1, "-1"]
    p = read(server, f"{server.url}/big/model.safetensors", "--list")
    assert p.returncode == 0, p.stderr
