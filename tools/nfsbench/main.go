// Command nfsbench measures an NFSv3 server as a client sees it and
// prints the result as one JSON object. The benchmarks run it against
// duet's NFS server and against nfs-ganesha on the same lab node.
//
//	nfsbench -server 10.250.0.1 -port 2049 [-mount-port 2049] -export /srv/nfs \
//	    -mode latency -file F -size 4096 -count 1000 -span 16MiB
//	    UNSTABLE writes of -size bytes at random offsets within a prefilled
//	    span, each followed by COMMIT; reports per-call latency
//	    percentiles (WRITE+COMMIT).
//	nfsbench ... -mode throughput -file F -size 64K -total 256MiB -every 1MiB
//	    sequential UNSTABLE writes, COMMIT after every -every bytes and at
//	    the end; reports MB/s.
//	nfsbench ... -mode ping -timeout 2s
//	    mounts and calls NULL: exits 0 once the server answers.
//
// It mounts once (MOUNT v3 on -mount-port), creates -file in the export's
// root and removes it at the end. Only an NFS client: it never touches
// the server's filesystem.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
	"github.com/duet-ha/duet/tools/internal/size"
)

// Result is what one run measured (the fields of tools/syncbench).
type Result struct {
	Mode      string    `json:"mode"`
	Calls     int       `json:"calls"`
	Bytes     int64     `json:"bytes"`
	Seconds   float64   `json:"seconds"`
	MBps      float64   `json:"mb_per_s,omitempty"`
	P50Ms     float64   `json:"p50_ms,omitempty"`
	P99Ms     float64   `json:"p99_ms,omitempty"`
	SamplesMs []float64 `json:"samples_ms,omitempty"`
}

func main() {
	server := flag.String("server", "", "server address (no port)")
	port := flag.Int("port", 2049, "NFS port")
	mountPort := flag.Int("mount-port", 0, "MOUNT port (default: the NFS port)")
	export := flag.String("export", "", "exported path to mount")
	mode := flag.String("mode", "latency", "latency or throughput")
	file := flag.String("file", "", "file name to create in the export's root")
	blockSize := flag.String("size", "4096", "bytes per write (suffixes K, M, KiB, MiB)")
	count := flag.Int("count", 1000, "latency mode: WRITE+COMMIT calls")
	span := flag.String("span", "16MiB", "latency mode: random offsets within this many prefilled bytes")
	total := flag.String("total", "256MiB", "throughput mode: bytes to write")
	every := flag.String("every", "1MiB", "throughput mode: COMMIT after this many bytes")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up after this long (calls are retried like a hard mount's until then)")
	flag.Parse()
	if *server == "" || *export == "" || *file == "" && *mode != "ping" {
		fail("-server, -export and -file are required")
	}
	if *mountPort == 0 {
		*mountPort = *port
	}
	bs := parseSize(*blockSize)
	dialer := func(p int) func(ctx context.Context) (net.Conn, error) {
		addr := net.JoinHostPort(*server, strconv.Itoa(p))
		// From a privileged port, as a Linux mount: duet's server
		// refuses others unless --insecure.
		return func(ctx context.Context) (net.Conn, error) {
			return nfsclient.DialReserved(ctx, net.Dialer{}, "tcp", addr)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	mc := nfsclient.New(dialer(*mountPort))
	root, err := mc.Mount(ctx, *export)
	check(err)
	mc.Close()
	c := nfsclient.New(dialer(*port))
	defer c.Close()
	if *mode == "ping" {
		check(c.Null(ctx))
		return
	}
	fh, err := c.Create(ctx, root, *file, nfsclient.Unchecked, 0o644)
	check(err)
	defer c.Remove(ctx, root, *file)
	// Incompressible data, as duet's compression must not flatter it.
	pool := make([]byte, 8<<20)
	rand.Read(pool)
	data := func(i int) []byte {
		off := (i * 4099) % (len(pool) - bs)
		return pool[off : off+bs]
	}
	var r Result
	r.Mode = *mode
	switch *mode {
	case "latency":
		sp := parseSize(*span)
		if sp < bs {
			fail("-span is smaller than -size")
		}
		for off := 0; off < sp; off += 1 << 20 {
			n := min(1<<20, sp-off)
			_, err := c.Write(ctx, fh, uint64(off), pool[:n], nfsclient.Unstable)
			check(err)
		}
		_, err = c.Commit(ctx, fh)
		check(err)
		lat := make([]float64, 0, *count)
		start := time.Now()
		for i := range *count {
			off := uint64(mrand.IntN(sp/bs)) * uint64(bs)
			t0 := time.Now()
			if _, err := c.Write(ctx, fh, off, data(i), nfsclient.Unstable); err != nil {
				fail(fmt.Sprintf("write %d: %v", i, err))
			}
			if _, err := c.Commit(ctx, fh); err != nil {
				fail(fmt.Sprintf("commit %d: %v", i, err))
			}
			lat = append(lat, float64(time.Since(t0))/1e6)
		}
		r.Seconds = time.Since(start).Seconds()
		r.Calls, r.Bytes = *count, int64(*count*bs)
		slices.Sort(lat)
		r.P50Ms, r.P99Ms = pct(lat, 0.50), pct(lat, 0.99)
		r.SamplesMs = lat
	case "throughput":
		tot, ev := parseSize(*total), parseSize(*every)
		start := time.Now()
		since := 0
		for off, i := 0, 0; off < tot; off, i = off+bs, i+1 {
			if _, err := c.Write(ctx, fh, uint64(off), data(i), nfsclient.Unstable); err != nil {
				fail(fmt.Sprintf("write at %d: %v", off, err))
			}
			r.Calls++
			if since += bs; since >= ev {
				if _, err := c.Commit(ctx, fh); err != nil {
					fail(fmt.Sprintf("commit at %d: %v", off, err))
				}
				since = 0
			}
		}
		if _, err := c.Commit(ctx, fh); err != nil {
			fail(fmt.Sprintf("final commit: %v", err))
		}
		r.Seconds = time.Since(start).Seconds()
		r.Bytes = int64(tot)
		r.MBps = float64(tot) / 1e6 / r.Seconds
	default:
		fail("-mode: latency or throughput, not " + *mode)
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}

func pct(sorted []float64, p float64) float64 {
	return sorted[min(len(sorted)-1, int(p*float64(len(sorted))))]
}

// parseSize reads a size flag (tools/internal/size), or ends the run.
func parseSize(s string) int {
	v, err := size.Parse(s)
	check(err)
	return int(v)
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "nfsbench:", msg)
	os.Exit(1)
}
