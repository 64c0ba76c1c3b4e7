package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// The lab's addresses (tools/lab/lab.sh).
const (
	labNodeA   = "10.250.0.1"
	nfsDuet    = 2049 // duet nfs-serve: NFS and MOUNT on one port
	nfsGanesha = 2050 // ganesha NFS; MOUNT on the next port
)

// nfsFigures serves two directories of nodeA's replicated tree over
// NFSv3, one with duet's server and one with nfs-ganesha (VFS FSAL), both
// under `duet exec` so that every COMMIT waits for the peer, and measures
// them from the lab's client namespace with tools/nfsbench: 4 KiB
// WRITE+COMMIT latency and 64 KiB sequential throughput with a COMMIT
// every MiB. The order of the two servers alternates from run to run.
func (b *bench) nfsFigures(runs int) []Figure {
	for _, t := range []string{"ganesha.nfsd", "rpcbind"} {
		if _, err := exec.LookPath(t); err != nil {
			fail(t + " not installed (apt-get install nfs-ganesha nfs-ganesha-vfs rpcbind): the NFS rows compare duet's server with ganesha")
		}
	}
	calls, total, span := 1000, "256MiB", "16MiB"
	if b.quick {
		calls, total, span = 100, "16MiB", "4MiB"
	}
	client := filepath.Join(os.TempDir(), "duet-bench-nfsbench")
	if out, err := exec.Command("go", "build", "-o", client, "./tools/nfsbench").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("building nfsbench: %v\n%s", err, out))
	}
	duetDir := filepath.Join(b.lab, "a/data/nfs-duet")
	ganDir := filepath.Join(b.lab, "a/data/nfs-ganesha")
	for _, d := range []string{duetDir, ganDir} {
		if err := os.MkdirAll(d, 0o777); err != nil {
			fail(err.Error())
		}
		// The client calls as root, which duet's server squashes to its
		// anonymous user, who must be able to create the test file.
		os.Chmod(d, 0o777)
	}
	conf := filepath.Join(b.lab, "ganesha-bench.conf")
	if err := os.WriteFile(conf, []byte(ganeshaBenchConfig(ganDir)), 0o644); err != nil {
		fail(err.Error())
	}
	aConf := filepath.Join(b.lab, "a.yaml")
	inA := func(args ...string) *exec.Cmd {
		cmd := exec.Command("ip", append([]string{"netns", "exec", "duet-a"}, args...)...)
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		return cmd
	}
	var procs []*exec.Cmd
	defer func() {
		for _, p := range procs {
			syscall.Kill(-p.Process.Pid, syscall.SIGTERM)
			p.Wait()
		}
	}()
	start := func(logName string, cmd *exec.Cmd) {
		lf, err := os.Create(filepath.Join(b.lab, logName))
		if err != nil {
			fail(err.Error())
		}
		cmd.Stdout, cmd.Stderr = lf, lf
		if err := cmd.Start(); err != nil {
			fail(fmt.Sprintf("starting %v: %v", cmd.Args, err))
		}
		procs = append(procs, cmd)
	}
	// ganesha's NFSv3 registers with rpcbind and exits without it. One
	// already running on the machine serves as well (its socket is a
	// path): this one then exits at once.
	start("rpcbind-bench.log", inA("rpcbind", "-f"))
	time.Sleep(300 * time.Millisecond)
	start("nfs-duet-bench.log", inA(b.bin, "exec", "--config", aConf, "--",
		b.bin, "nfs-serve", duetDir, "--listen", fmt.Sprintf("%s:%d", labNodeA, nfsDuet)))
	start("nfs-ganesha-bench.log", inA(b.bin, "exec", "--config", aConf, "--",
		"ganesha.nfsd", "-F", "-f", conf, "-L", filepath.Join(b.lab, "ganesha-bench-server.log"), "-p", filepath.Join(b.lab, "ganesha-bench.pid")))

	type server struct {
		name            string
		port, mountPort int
		export          string
	}
	servers := []*server{
		{name: "duet", port: nfsDuet, mountPort: nfsDuet, export: "/"},
		{name: "ganesha", port: nfsGanesha, mountPort: nfsGanesha + 1, export: ganDir},
	}
	run := func(s *server, args ...string) nfsResult {
		base := []string{"exec", "c", client, "-server", labNodeA, "-port", strconv.Itoa(s.port),
			"-mount-port", strconv.Itoa(s.mountPort), "-export", s.export}
		out, err := b.sh(append(base, args...)...)
		if err != nil {
			fail(fmt.Sprintf("nfsbench against %s: %v\n%s\nserver logs in %s", s.name, err, out, b.lab))
		}
		var r nfsResult
		if args[1] != "ping" {
			if err := json.Unmarshal([]byte(lastLine(out)), &r); err != nil {
				fail(fmt.Sprintf("nfsbench output: %v\n%s", err, out))
			}
		}
		return r
	}
	for _, s := range servers {
		ok := false
		for range 60 {
			base := []string{"exec", "c", client, "-server", labNodeA, "-port", strconv.Itoa(s.port),
				"-mount-port", strconv.Itoa(s.mountPort), "-export", s.export, "-mode", "ping", "-timeout", "1s"}
			if _, err := b.sh(base...); err == nil {
				ok = true
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		if !ok {
			fail(fmt.Sprintf("the %s NFS server does not answer after 30 s (logs in %s)", s.name, b.lab))
		}
	}
	b.waitSync()
	p50 := Figure{Name: fmt.Sprintf("NFSv3 4 KiB WRITE + COMMIT at random offsets (in a %s file), p50 latency over %d calls: duet nfs-serve / nfs-ganesha", span, calls),
		Target: "n/a", Met: true, Unit: "ms",
		Note: "both servers on nodeA under duet exec (each COMMIT waits for the peer), the client in the lab's client namespace; ganesha's handles do not survive a failover, duet's do"}
	p99 := Figure{Name: "same, p99 latency", Target: "n/a", Met: true, Unit: "ms"}
	seq := Figure{Name: "NFSv3 64 KiB sequential UNSTABLE writes, COMMIT every 1 MiB (" + total + "): throughput duet nfs-serve / nfs-ganesha",
		Target: "n/a", Met: true, Unit: "MB/s", Note: "incompressible data"}
	for i := range runs {
		order := servers
		if i%2 == 1 {
			order = []*server{servers[1], servers[0]}
		}
		res := map[string][2]nfsResult{}
		for _, s := range order {
			settle()
			l := run(s, "-mode", "latency", "-file", fmt.Sprintf("lat-%d", i), "-size", "4096",
				"-count", strconv.Itoa(calls), "-span", span)
			settle()
			t := run(s, "-mode", "throughput", "-file", fmt.Sprintf("seq-%d", i), "-size", "64K",
				"-total", total, "-every", "1MiB")
			res[s.name] = [2]nfsResult{l, t}
			b.waitSync()
		}
		d, g := res["duet"], res["ganesha"]
		b.plots.addLatency("NFS COMMIT, duet nfs-serve", d[0].SamplesMs)
		b.plots.addLatency("NFS COMMIT, ganesha", g[0].SamplesMs)
		p50.add(g[0].P50Ms, d[0].P50Ms)
		p99.add(g[0].P99Ms, d[0].P99Ms)
		seq.add(g[1].MBps, d[1].MBps)
	}
	return []Figure{p50, p99, seq}
}

type nfsResult struct {
	P50Ms     float64   `json:"p50_ms"`
	P99Ms     float64   `json:"p99_ms"`
	MBps      float64   `json:"mb_per_s"`
	SamplesMs []float64 `json:"samples_ms"`
}

// ganeshaBenchConfig exports dir over NFSv3 only (the bench's client
// speaks v3), MOUNT on the port after NFS's.
func ganeshaBenchConfig(dir string) string {
	return fmt.Sprintf(`NFS_CORE_PARAM {
	Protocols = 3;
	NFS_Port = %d;
	MNT_Port = %d;
	Enable_NLM = false;
	Enable_RQUOTA = false;
	Enable_UDP = false;
}
NFS_KRB5 { Active_krb5 = false; }
EXPORT {
	Export_Id = 1;
	Path = "%s";
	Pseudo = "%s";
	Access_Type = RW;
	Squash = No_Root_Squash;
	SecType = none, sys;
	Protocols = 3;
	Transports = TCP;
	FSAL { Name = VFS; }
}
`, nfsGanesha, nfsGanesha+1, dir, dir)
}
