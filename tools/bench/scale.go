package main

import (
	"crypto/rand"
	"fmt"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// scaleDirSize is how many files the scale tree's ordinary directories hold.
const scaleDirSize = 1000

// scaleTree is the scale figure's tree of files, inside the replicated
// directory: a tenth of them in one huge directory, the others in
// directories of scaleDirSize entries.
type scaleTree struct{ files int }

func (t scaleTree) huge() int { return t.files / 10 }

// path is the i-th file's path, relative to the replicated directory.
func (t scaleTree) path(i int) string {
	if i < t.huge() {
		return fmt.Sprintf("scale/huge/f%07d", i)
	}
	return fmt.Sprintf("scale/d%04d/f%07d", (i-t.huge())/scaleDirSize, i)
}

// scaleSize draws a file's size: mixed small sizes, 0 to 8 KiB, and one
// file in twenty of 64 KiB.
func scaleSize(rng *mrand.Rand) int {
	if rng.Intn(20) == 0 {
		return 64 << 10
	}
	return rng.Intn(8<<10 + 1)
}

// write gives the i-th file under root a new size and new random
// (incompressible) contents, and returns the size.
func (t scaleTree) write(root string, i int, rng *mrand.Rand, buf []byte) int {
	n := scaleSize(rng)
	rand.Read(buf[:n])
	if err := os.WriteFile(filepath.Join(root, t.path(i)), buf[:n], 0o644); err != nil {
		fail("scale tree: " + err.Error())
	}
	return n
}

// make writes the whole tree under root and returns its bytes.
func (t scaleTree) make(root string, rng *mrand.Rand) int64 {
	buf := make([]byte, 64<<10)
	var total int64
	dir := ""
	for i := range t.files {
		if d := filepath.Dir(t.path(i)); d != dir {
			if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
				fail("scale tree: " + err.Error())
			}
			dir = d
		}
		total += int64(t.write(root, i, rng, buf))
	}
	return total
}

// change rewrites n files picked at random, whole.
func (t scaleTree) change(root string, n int, rng *mrand.Rand) {
	buf := make([]byte, 64<<10)
	for range n {
		t.write(root, rng.Intn(t.files), rng, buf)
	}
}

// scaleLabSize is the size of each lab filesystem for a scale tree of
// files: about 9 KiB of blocks a file, and ext4 makes an inode per 16 KiB.
func scaleLabSize(files int) string {
	gib := (int64(files)*24<<10 + 1<<30 - 1) >> 30
	return fmt.Sprintf("%dG", max(gib, 4))
}

// statusKiB reads a field given in kB (VmRSS, VmHWM) of the text of a
// /proc/<pid>/status.
func statusKiB(status, field string) (int64, error) {
	for _, line := range strings.Split(status, "\n") {
		name, v, ok := strings.Cut(line, ":")
		if !ok || name != field {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("%q: not a size in kB", line)
		}
		return strconv.ParseInt(f[0], 10, 64)
	}
	return 0, fmt.Errorf("no %s", field)
}

// memMiB is field of host's daemon's /proc/<pid>/status, in MiB.
func (b *bench) memMiB(host, field string) float64 {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", b.pid(host)))
	if err != nil {
		fail(fmt.Sprintf("node%s's daemon: %v", strings.ToUpper(host), err))
	}
	kib, err := statusKiB(string(s), field)
	if err != nil {
		fail(fmt.Sprintf("node%s's daemon status: %v", strings.ToUpper(host), err))
	}
	return float64(kib) / 1024
}

// forget stops both daemons and makes them a fresh pair: no state, an
// empty tree on nodeB, and on nodeA too if wipeA.
func (b *bench) forget(wipeA bool) {
	b.must("stop", "b")
	b.must("stop", "a")
	dirs := []string{"b/data", "a/.duet", "b/.duet"}
	if wipeA {
		dirs = append(dirs, "a/data")
	}
	for _, d := range dirs {
		p := filepath.Join(b.lab, d)
		if err := os.RemoveAll(p); err != nil {
			fail(err.Error())
		}
		if err := os.MkdirAll(p, 0o755); err != nil {
			fail(err.Error())
		}
	}
}

// logSizes are the lengths of both daemons' logs, to read what follows.
func (b *bench) logSizes() map[string]int {
	off := map[string]int{}
	for _, h := range []string{"a", "b"} {
		s, _ := os.ReadFile(filepath.Join(b.lab, h+".log"))
		off[h] = len(s)
	}
	return off
}

// checkClean fails if a daemon logged since off that it had not stopped
// cleanly: lab.sh stop kills a daemon still running after 10 s, and the
// restart measured would then be a crash's.
func (b *bench) checkClean(off map[string]int) {
	for h, n := range off {
		s, _ := os.ReadFile(filepath.Join(b.lab, h+".log"))
		if n <= len(s) && strings.Contains(string(s[n:]), "did not stop cleanly") {
			fail(fmt.Sprintf("node%s's daemon did not stop cleanly within lab.sh stop's 10 s: the clean restart row would time a crash's", strings.ToUpper(h)))
		}
	}
}

// verify times `duet verify` on nodeA; copies that differ fail the bench.
func (b *bench) verify(limit time.Duration) float64 {
	settle()
	t0 := time.Now()
	out, err := b.sh("duet", "a", "verify", "--timeout", limit.String())
	if err != nil {
		fail(fmt.Sprintf("duet verify: %v (the copies differ after the crash restart?)\n%s", err, tail(out, 3000)))
	}
	return time.Since(t0).Seconds()
}

// churnResult is what churn measured.
type churnResult struct {
	latMs      []float64 // per file, until nodeB has it whole
	secs, cpu  float64   // the churn's time until nodeB has the last; nodeA's daemon's CPU seconds meanwhile
	rssA, rssB float64   // the largest VmRSS of each daemon, MiB
	// fileA, fileB: the RssFile of that sample, MiB (the binary, and
	// the capture ring's pages, which the kernel maps twice)
	fileA, fileB float64
}

// churn creates 1 KiB files in the huge directory on nodeA, one every
// 2 ms for d, and polls nodeB's copy of each by name until it is whole,
// sampling both daemons' RSS every 100 ms meanwhile.
func (b *bench) churn(run int, d time.Duration) churnResult {
	const size = 1024
	type created struct {
		name string
		at   time.Time
	}
	n := int(d / (2 * time.Millisecond))
	made := make(chan created, n)
	dirA, dirB := filepath.Join(b.lab, "a/data/scale/huge"), filepath.Join(b.lab, "b/data/scale/huge")
	var r churnResult
	cpu0 := cpuSeconds(b.pid("a"))
	start := time.Now()
	go func() {
		body := make([]byte, size)
		for i := range n {
			time.Sleep(time.Until(start.Add(time.Duration(i) * 2 * time.Millisecond)))
			name := fmt.Sprintf("churn-%d-%05d", run, i)
			rand.Read(body)
			if err := os.WriteFile(filepath.Join(dirA, name), body, 0o644); err != nil {
				fail("churn: " + err.Error())
			}
			made <- created{name, time.Now()}
		}
		close(made)
	}()
	var pending []created
	var names []string
	sample := start
	for open := true; open || len(pending) > 0; time.Sleep(time.Millisecond) {
	drain:
		for {
			select {
			case c, ok := <-made:
				if !ok {
					open = false
					break drain
				}
				pending = append(pending, c)
				names = append(names, c.name)
			default:
				break drain
			}
		}
		left := pending[:0]
		for _, c := range pending {
			if fi, err := os.Stat(filepath.Join(dirB, c.name)); err == nil && fi.Size() == size {
				r.latMs = append(r.latMs, float64(time.Since(c.at))/float64(time.Millisecond))
			} else {
				left = append(left, c)
			}
		}
		pending = left
		if len(pending) > 0 && time.Since(pending[0].at) > time.Minute {
			fail(fmt.Sprintf("churn: nodeB has no whole %s a minute after its create", pending[0].name))
		}
		if time.Since(sample) >= 100*time.Millisecond {
			if v := b.memMiB("a", "VmRSS"); v > r.rssA {
				r.rssA, r.fileA = v, b.memMiB("a", "RssFile")
			}
			if v := b.memMiB("b", "VmRSS"); v > r.rssB {
				r.rssB, r.fileB = v, b.memMiB("b", "RssFile")
			}
			sample = time.Now()
		}
	}
	r.secs, r.cpu = time.Since(start).Seconds(), cpuSeconds(b.pid("a"))-cpu0
	for _, name := range names {
		os.Remove(filepath.Join(dirA, name))
	}
	b.waitSync()
	return r
}

// scaleFigures measures duet on a tree of many small files against rsync
// over the same lab link: the initial sync of a fresh pair, the daemons'
// memory, a clean restart and a crash restart of both, verify, and
// creates in a huge directory. Each run starts from a fresh pair and an
// empty nodeB; nodeA's tree is made once.
func (b *bench) scaleFigures(runs, files int) []Figure {
	if _, err := exec.LookPath("rsync"); err != nil {
		fail("rsync not installed (apt-get install rsync): the scale figures compare with it")
	}
	t := scaleTree{files}
	changes := files / 100
	// Generous: about 3 ms a file for what walks the whole tree.
	limit := max(300*time.Second, time.Duration(files)*3*time.Millisecond)
	churnFor := 5 * time.Second
	if b.quick {
		churnFor = 2 * time.Second
	}
	tree := fmt.Sprintf("%d files (0–8 KiB, one in twenty 64 KiB; directories of %d and one of %d)", files, scaleDirSize, t.huge())
	initial := Figure{Name: "scale, " + tree + ": initial sync of a fresh pair until `status --wait-sync` returns, duet / rsync -a",
		Target: "≤ 1.0", Unit: "s",
		Note: "duet: from the start of both daemons (state directories emptied, nodeB's tree empty) to in sync; rsync -a (no --inplace) from nodeA's namespace to an rsync daemon in nodeB's, duet stopped, nodeB's tree empty; page cache dropped before each"}
	row := func(name, target, unit, note string) Figure {
		return Figure{Name: name, Target: target, Unit: unit, Note: note}
	}
	hwmNote := "VmHWM of /proc/<pid>/status right after the initial sync: the daemons started fresh, so their peak since the start; baseline is the target"
	initA := row("same, nodeA's (primary's) peak RSS during the initial sync, over the 256 MiB target", "≤ 1.0 (max)", "MiB", hwmNote)
	initB := row("same, nodeB's (secondary's) peak RSS during the initial sync, over the 256 MiB target", "≤ 1.0 (max)", "MiB", hwmNote)
	rssNote := "largest VmRSS of /proc/<pid>/status, sampled every 100 ms during the churn row below (after the clean restart); baseline is the target"
	steadyA := row("same, nodeA's (primary's) peak RSS during steady replication, over the 64 MiB target", "≤ 1.0 (max)", "MiB", rssNote)
	steadyB := row("same, nodeB's (secondary's) peak RSS during steady replication, over the 64 MiB target", "≤ 1.0 (max)", "MiB", rssNote)
	restart := row("same, clean restart of both daemons until in sync, over the 5 s target", "≤ 1.0", "s",
		"SIGTERM to nodeB then nodeA (lab.sh stop; the bench fails if a daemon then logs it did not stop cleanly), both started, until `status --wait-sync`; baseline is the target")
	crash := row(fmt.Sprintf("same, crash restart: both daemons SIGKILLed, %d files rewritten on nodeA meanwhile, restarted until in sync, duet / rsync -a of as many changes", changes), "≤ 1.0", "s",
		"duet: lab.sh kill of nodeB then nodeA, the files rewritten whole (new size and random contents), both started, until `status --wait-sync`; rsync: duet stopped cleanly, as many other files rewritten, rsync -a of the whole tree (its quick check, size and mtime); page cache dropped before each")
	verify := row("same, duet verify / rsync -a --checksum --dry-run", "≤ 1.0", "s",
		"both read every file on both nodes; right after the crash restart (a difference fails the bench); page cache dropped before each, order alternating")
	churnNote := fmt.Sprintf("1 KiB files created in the directory of %d entries on nodeA, one every 2 ms for %s; nodeB's copy polled by name every ms until whole; baseline is the 50 ms target", t.huge(), churnFor)
	p50 := row(fmt.Sprintf("same, a file created every 2 ms for %s in the directory of %d entries: time until nodeB has it, p50, over the 50 ms target", churnFor, t.huge()), "≤ 1.0", "ms", churnNote)
	p99 := row("same churn, p99, over the 50 ms target", "≤ 1.0", "ms", churnNote)
	cpu := row("same churn, nodeA's daemon's CPU seconds / the churn's seconds", "(context)", "s",
		"utime + stime of nodeA's daemon from the first create until nodeB has the last; baseline is that time")
	cpu.Met = true

	root := filepath.Join(b.lab, "a/data")
	rng := mrand.New(mrand.NewSource(18))
	b.forget(true)
	bytes := t.make(root, rng)
	var fileA, fileB []float64
	for i := range runs {
		b.forget(false)
		stop := b.rsyncDaemon()
		tr, _ := b.rsync("-a")
		stop()
		b.forget(false)
		settle()
		t0 := time.Now()
		b.startPair(limit)
		initial.add(tr, time.Since(t0).Seconds())
		initA.add(256, b.memMiB("a", "VmHWM"))
		initB.add(256, b.memMiB("b", "VmHWM"))

		b.stopPair()
		off := b.logSizes()
		settle()
		t0 = time.Now()
		b.startPair(limit)
		restart.add(5, time.Since(t0).Seconds())
		b.checkClean(off)

		settle()
		c := b.churn(i, churnFor)
		steadyA.add(64, c.rssA)
		steadyB.add(64, c.rssB)
		fileA, fileB = append(fileA, c.fileA), append(fileB, c.fileB)
		p50.add(50, quantile(c.latMs, 0.5))
		p99.add(50, quantile(c.latMs, 0.99))
		cpu.add(c.secs, c.cpu)

		b.must("kill", "b")
		b.must("kill", "a")
		t.change(root, changes, rng)
		settle()
		t0 = time.Now()
		b.startPair(limit)
		td := time.Since(t0).Seconds()

		stop = b.rsyncDaemon()
		var tv, tc float64
		pair(i, func() { tc, _ = b.rsync("-a", "--checksum", "--dry-run") }, func() { tv = b.verify(limit) })
		stop()
		verify.add(tc, tv)

		b.stopPair()
		t.change(root, changes, rng)
		stop = b.rsyncDaemon()
		tr, _ = b.rsync("-a")
		stop()
		crash.add(tr, td)
	}
	// The figures that follow start from an empty pair.
	b.forget(true)
	b.startPair(limit)
	initial.Note += fmt.Sprintf("; the tree holds %.0f MiB", float64(bytes)/(1<<20))
	fileNote := func(mib []float64) string {
		var s []string
		for _, v := range mib {
			s = append(s, fmt.Sprintf("%.1f", v))
		}
		return "; of it file-backed (RssFile: the binary, and on nodeA the capture ring, 16 MiB by default), per run: " + strings.Join(s, ", ") + " MiB"
	}
	steadyA.Note += fileNote(fileA)
	steadyB.Note += fileNote(fileB)
	for _, f := range []*Figure{&initial, &restart, &crash, &verify, &p50, &p99} {
		f.Met = median(f.Ratio) <= 1
	}
	for _, f := range []*Figure{&initA, &initB, &steadyA, &steadyB} {
		f.Met = quantile(f.Ratio, 1) <= 1
	}
	return []Figure{initial, initA, initB, steadyA, steadyB, restart, crash, verify, p50, p99, cpu}
}
