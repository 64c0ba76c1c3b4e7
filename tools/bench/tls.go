package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/duet-ha/duet/tools/internal/size"
)

// tlsFigures measures what the TLS 1.3 link between the nodes costs: both
// nodes restarted with `insecure_plaintext_link: true`, then without it,
// the order alternating from run to run (A-B-B-A), and the same two
// measurements in each: 4 KiB random write + fdatasync under `duet exec`
// (p50), and 64 KiB sequential buffered writes of incompressible data
// until the peer has them all (write, then `status --wait-sync`).
func (b *bench) tlsFigures(runs int) []Figure {
	calls, total, span, streams := 1000, "256MiB", "64MiB", 5
	if b.quick {
		calls, total, span, streams = 100, "32MiB", "8MiB", 1
	}
	totalBytes, err := size.Parse(total)
	if err != nil {
		fail(err.Error())
	}
	if b.syncbenchBin == "" {
		b.buildSyncbench()
	}
	confs := map[string][]byte{}
	for _, h := range []string{"a", "b"} {
		c, err := os.ReadFile(filepath.Join(b.lab, h+".yaml"))
		if err != nil {
			fail(err.Error())
		}
		confs[h] = c
	}
	mode := "tls"
	setMode := func(m string) {
		if m == mode {
			return
		}
		// nodeB first: nodeA must keep the role.
		b.must("stop", "b")
		b.waitState("a", "ALONE")
		b.must("stop", "a")
		for h, c := range confs {
			if m == "plain" {
				c = append(append([]byte(nil), c...), "\ninsecure_plaintext_link: true\n"...)
			}
			if err := os.WriteFile(filepath.Join(b.lab, h+".yaml"), c, 0o644); err != nil {
				fail(err.Error())
			}
		}
		b.must("start", "a")
		b.waitServing()
		b.must("start", "b")
		b.waitSync()
		mode = m
	}
	defer setMode("tls")
	p50 := Figure{Name: fmt.Sprintf("TLS link / plaintext link: 4 KiB random write + fdatasync under duet exec (in a %s file), p50 over %d calls", span, calls),
		Target: "≤ 1.05", Unit: "ms", Note: "both nodes restarted with and without insecure_plaintext_link, order alternating"}
	seq := Figure{Name: "TLS link / plaintext link: 64 KiB sequential buffered writes of incompressible data (" + total + ") until the peer has them, throughput",
		Target: "≥ 0.95", Unit: "MB/s", Note: fmt.Sprintf("written, then `duet status --wait-sync`: the time until the peer holds every byte; per run and mode the median of %d streams", streams)}
	for i := range runs {
		order := []string{"tls", "plain"}
		if i%2 == 1 {
			order = []string{"plain", "tls"}
		}
		lat, thr := map[string]float64{}, map[string]float64{}
		for _, m := range order {
			setMode(m)
			file := filepath.Join(b.lab, "a", "data", fmt.Sprintf("tls-%s-%d", m, i))
			r := b.syncbench("a", true, "-mode", "latency", "-size", "4096", "-count", strconv.Itoa(calls), "-span", span, "-file", file)
			lat[m] = r.P50Ms
			b.waitSync()
			os.Remove(file)
			b.waitSync()
			// The stream's time is mostly both disks' flushes, whose
			// spread on the lab's loop devices is wider than what TLS
			// costs: the median of streams streams per mode and run.
			var rates []float64
			for range streams {
				settle()
				t0 := time.Now()
				b.syncbenchNow("a", false, "-mode", "throughput", "-size", "64K", "-every", total, "-total", total, "-file", file)
				b.must("duet", "a", "status", "--wait-sync", "300s")
				rates = append(rates, float64(totalBytes)/1e6/time.Since(t0).Seconds())
				os.Remove(file)
				b.waitSync()
			}
			thr[m] = median(rates)
		}
		p50.add(lat["plain"], lat["tls"])
		seq.add(thr["plain"], thr["tls"])
	}
	p50.Met = median(p50.Ratio) <= 1.05
	seq.Met = median(seq.Ratio) >= 0.95
	return []Figure{p50, seq}
}
