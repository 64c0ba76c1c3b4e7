package main

import (
	"crypto/rand"
	"fmt"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// resyncTree makes the benchmark's tree on nodeA: 16 files of 64 MiB and
// 1024 of 1 MiB (2 GiB in all, incompressible), or an eighth with quick.
func (b *bench) resyncTree() (big, small int) {
	big, small = 16, 1024
	if b.quick {
		big, small = 2, 128
	}
	dir := filepath.Join(b.lab, "a/data/tree")
	buf := make([]byte, 1<<20)
	write := func(path string, mib int) {
		os.MkdirAll(filepath.Dir(path), 0o755)
		f, err := os.Create(path)
		if err != nil {
			fail(err.Error())
		}
		for range mib {
			rand.Read(buf)
			if _, err := f.Write(buf); err != nil {
				fail(err.Error())
			}
		}
		f.Close()
	}
	for i := range big {
		write(filepath.Join(dir, fmt.Sprintf("big%02d", i)), 64)
	}
	for i := range small {
		write(filepath.Join(dir, fmt.Sprintf("s%02d/f%04d", i/64, i)), 1)
	}
	return big, small
}

// changeTree changes 1 % of the tree: half as scattered 4 KiB writes into
// the big files, half as small files rewritten whole. It returns the bytes
// changed.
func (b *bench) changeTree(big, small int, rng *mrand.Rand) int {
	dir := filepath.Join(b.lab, "a/data/tree")
	total := big*64<<20 + small<<20
	target := total / 100
	buf := make([]byte, 4096)
	changed := 0
	for changed < target/2 {
		f, err := os.OpenFile(filepath.Join(dir, fmt.Sprintf("big%02d", rng.Intn(big))), os.O_WRONLY, 0)
		if err != nil {
			fail(err.Error())
		}
		rand.Read(buf)
		f.WriteAt(buf, int64(rng.Intn(64<<20/4096))*4096)
		f.Close()
		changed += 4096
	}
	one := make([]byte, 1<<20)
	for changed < target {
		i := rng.Intn(small)
		rand.Read(one)
		os.WriteFile(filepath.Join(dir, fmt.Sprintf("s%02d/f%04d", i/64, i)), one, 0o644)
		changed += 1 << 20
	}
	return changed
}

// rsyncDaemon serves nodeB's tree to rsync clients in the lab.
func (b *bench) rsyncDaemon() func() {
	conf := filepath.Join(b.lab, "rsyncd.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf("[data]\npath = %s\nread only = false\nuid = root\ngid = root\nuse chroot = no\n",
		filepath.Join(b.lab, "b/data"))), 0o644)
	cmd := exec.Command("ip", "netns", "exec", "duet-b", "rsync", "--daemon", "--no-detach", "--config="+conf,
		"--address=10.250.0.2", "--port=8873")
	if err := cmd.Start(); err != nil {
		fail("rsync daemon: " + err.Error())
	}
	time.Sleep(300 * time.Millisecond)
	return func() {
		cmd.Process.Kill()
		cmd.Wait()
	}
}

// rsync runs rsync with args in nodeA's namespace, from nodeA's tree to
// the rsync daemon in nodeB's (see rsyncDaemon), starting from a settled
// page cache, and returns its time and output.
func (b *bench) rsync(args ...string) (float64, string) {
	cmd := append([]string{"netns", "exec", "duet-a", "rsync"}, args...)
	cmd = append(cmd, filepath.Join(b.lab, "a/data")+"/", "rsync://10.250.0.2:8873/data/")
	settle()
	t0 := time.Now()
	out, err := exec.Command("ip", cmd...).CombinedOutput()
	took := time.Since(t0).Seconds()
	if err != nil {
		fail(fmt.Sprintf("rsync %v: %v\n%s", args, err, tail(string(out), 3000)))
	}
	return took, string(out)
}

var rsyncSent = regexp.MustCompile(`Total bytes sent: ([0-9,.]+)`)
var rsyncRecv = regexp.MustCompile(`Total bytes received: ([0-9,.]+)`)

func statNumber(re *regexp.Regexp, out string) float64 {
	m := re.FindStringSubmatch(out)
	if m == nil {
		fail("rsync --stats: no " + re.String() + " in:\n" + out)
	}
	v, _ := strconv.ParseFloat(strings.ReplaceAll(strings.ReplaceAll(m[1], ",", ""), ".", ""), 64)
	return v
}

// resyncFigures: after 1 % of a 2 GiB tree changed while nodeB was
// stopped, the time and bytes duet takes to make nodeB a mirror again,
// against rsync -a --inplace of the same tree over the same lab network in
// the same run (duet stopped meanwhile).
func (b *bench) resyncFigures(runs int) []Figure {
	if _, err := exec.LookPath("rsync"); err != nil {
		fail("rsync not installed (apt-get install rsync): the resync figures compare with it")
	}
	bigN, smallN := b.resyncTree()
	made := time.Now()
	size := fmt.Sprintf("%d MiB", bigN*64+smallN)
	b.waitSync()
	// A restart compares by checksums the files changed within
	// resync.margin (30 s) before the bitmap was saved: a tree made just
	// before would be compared whole in the first run (2 GiB read on both
	// nodes against the 1 % the row means: 6.7 times rsync's time, the
	// other runs 1.6 to 2.4). Older than that, as a tree in service is.
	if wait := 31*time.Second - time.Since(made); wait > 0 && !b.quick {
		time.Sleep(wait)
	}
	rng := mrand.New(mrand.NewSource(3))
	journal := Figure{Name: "resync time after 1 % of a " + size + " tree changed while the secondary was stopped, duet (primary running on) / rsync -a --inplace",
		Target: "≤ 1.0", Unit: "s"}
	bitmap := Figure{Name: "same, both nodes stopped and restarted (duet resyncs from the saved bitmap) / rsync",
		Target: "≤ 1.0", Unit: "s"}
	proper := Figure{Name: "same, the resync proper (from its start to the peer's last durable ack, without the daemon's start and cluster join) / rsync",
		Target: "≤ 1.0", Unit: "s"}
	bytesJ := Figure{Name: "resync bytes on the wire, duet (primary running on) / rsync", Target: "≤ 1.1", Unit: "bytes"}
	bytesB := Figure{Name: "resync bytes on the wire, duet (bitmap) / rsync", Target: "≤ 1.1", Unit: "bytes"}
	var changedJ, changedB, changedR []float64
	for range runs {
		// duet, primary running on: nodeB stops cleanly, comes back.
		b.must("stop", "b")
		b.waitState("a", "ALONE")
		changedJ = append(changedJ, float64(b.changeTree(bigN, smallN, rng)))
		settle()
		st0 := b.status().Dirs[0]
		t0 := time.Now()
		b.must("start", "b")
		b.waitSync()
		tj := time.Since(t0).Seconds()
		st1 := b.status().Dirs[0]
		wj := float64(st1.WireBytes - st0.WireBytes)

		// duet, both stopped: the bitmap saved at nodeA's stop.
		b.must("stop", "b")
		b.waitState("a", "ALONE")
		changedB = append(changedB, float64(b.changeTree(bigN, smallN, rng)))
		b.must("stop", "a")
		b.must("start", "a")
		b.waitState("a", "ALONE")
		settle()
		t0 = time.Now()
		b.must("start", "b")
		b.waitSync()
		tb := time.Since(t0).Seconds()
		stb := b.status().Dirs[0]
		wb := float64(stb.WireBytes)
		tp := stb.Resync.Ended.Sub(stb.Resync.Started).Seconds()

		// rsync, duet stopped on both nodes.
		b.stopPair()
		changedR = append(changedR, float64(b.changeTree(bigN, smallN, rng)))
		stop := b.rsyncDaemon()
		tr, out := b.rsync("-a", "--inplace", "--no-whole-file", "--stats")
		stop()
		wr := statNumber(rsyncSent, out) + statNumber(rsyncRecv, out)
		b.must("start", "a")
		b.waitServing()
		b.must("start", "b")
		b.waitSync()

		journal.add(tr, tj)
		bitmap.add(tr, tb)
		proper.add(tr, tp)
		bytesJ.add(wr, wj)
		bytesB.add(wr, wb)
	}
	journal.Met, bitmap.Met, proper.Met = median(journal.Ratio) <= 1, median(bitmap.Ratio) <= 1, median(proper.Ratio) <= 1
	bytesJ.Met, bytesB.Met = median(bytesJ.Ratio) <= 1.1, median(bytesB.Ratio) <= 1.1
	mib := func(v []float64) string {
		var out []string
		for _, x := range v {
			out = append(out, fmt.Sprintf("%.1f", x/(1<<20)))
		}
		return strings.Join(out, ", ")
	}
	note := fmt.Sprintf("changed per run: %s MiB (duet, running on), %s MiB (duet, bitmap), %s MiB (rsync); rsync: daemon in nodeB's namespace, client in nodeA's, --no-whole-file (its delta algorithm), bytes = sent + received from --stats; duet bytes = frame bytes of nodeA's status; time from the secondary's start to in sync (duet) or rsync's run",
		mib(changedJ), mib(changedB), mib(changedR))
	journal.Note, bitmap.Note, proper.Note = note, note, note
	b.plots.bars = append(b.plots.bars,
		barChart{file: "resync-time.png", title: "resync after 1 % of a " + size + " tree changed: time (median)", unit: "s",
			labels: []string{"rsync -a --inplace", "duet\n(primary running on)", "duet\n(bitmap)", "duet\n(resync proper)"},
			values: []float64{median(journal.Baseline), median(journal.Measured), median(bitmap.Measured), median(proper.Measured)}},
		barChart{file: "resync-bytes.png", title: "resync after 1 % of a " + size + " tree changed: bytes on the wire (median)", unit: "MB",
			labels: []string{"rsync -a --inplace", "duet\n(primary running on)", "duet\n(bitmap)"},
			values: []float64{median(bytesJ.Baseline) / 1e6, median(bytesJ.Measured) / 1e6, median(bytesB.Measured) / 1e6}})
	return []Figure{journal, bitmap, proper, bytesJ, bytesB}
}
