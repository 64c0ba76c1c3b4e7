package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// treeState lists a tree's regular files with their sizes and mtimes (in
// seconds, the precision rsync's quick check works to): two trees with the
// same state hold the same files, as rsync itself decides.
func treeState(dir string) string {
	var b strings.Builder
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(&b, "%s %d %d\n", rel, fi.Size(), fi.ModTime().Unix())
		return nil
	})
	return b.String()
}

// lsyncdMissedAfter: see waitSame.
var lsyncdMissedAfter = 10 * time.Second

// waitSame waits until nodeB's copy of rel has the state of nodeA's and
// returns how long it took (capped at limit). A copy that holds all of
// nodeA's entries but keeps some that nodeA removed, unchanged for
// lsyncdMissedAfter, is a delete lsyncd missed (a file git creates and renames
// at once, .git/index.lock, was left on nodeB in a make test run): the
// time is then the one at which nothing of nodeA's was missing, which
// favours lsyncd, and the entries are kept for the figure's note.
func (b *bench) waitSame(rel string, limit time.Duration) time.Duration {
	start := time.Now()
	src, dst := filepath.Join(b.lab, "a/data", rel), filepath.Join(b.lab, "b/data", rel)
	want := treeState(src)
	complete, extraSince, lastExtra := time.Duration(-1), time.Time{}, ""
	for time.Since(start) < limit {
		got := treeState(dst)
		if got == want {
			return time.Since(start)
		}
		if missing, _ := linesNotIn(want, got); missing == 0 {
			if complete < 0 {
				complete = time.Since(start)
			}
			extras := extraLines(got, want)
			if extra := strings.Join(extras, "\n"); extra != lastExtra {
				lastExtra, extraSince = extra, time.Now()
			} else if len(extras) > 0 && time.Since(extraSince) >= lsyncdMissedAfter {
				first := fmt.Sprintf("%q", extras[0])
				if !slices.ContainsFunc(b.lsyncdMissed, func(m string) bool { return strings.Contains(m, first) }) {
					b.lsyncdMissed = append(b.lsyncdMissed, fmt.Sprintf("%s: %d entries nodeA does not have (first: %s)", rel, len(extras), first))
				}
				return complete
			}
		} else {
			complete, lastExtra = -1, ""
		}
		time.Sleep(100 * time.Millisecond)
	}
	missing, mFirst := linesNotIn(want, treeState(dst))
	extra, eFirst := linesNotIn(treeState(dst), want)
	log, _ := os.ReadFile(filepath.Join(b.lab, "lsyncd.log"))
	// Both ways: an entry left on nodeB that nodeA removed (a delete
	// lsyncd missed) also differs.
	fail(fmt.Sprintf("lsyncd: nodeB's %s is not nodeA's after %s: %d of nodeA's files missing or different there (first: %q), %d there not on nodeA (first: %q); lsyncd log:\n%s",
		rel, limit, missing, mFirst, extra, eFirst, tail(string(log), 3000)))
	return 0
}

// extraLines are a's lines that b lacks.
func extraLines(a, b string) []string {
	have := map[string]bool{}
	for _, l := range strings.Split(b, "\n") {
		have[l] = true
	}
	var out []string
	for _, l := range strings.Split(a, "\n") {
		if !have[l] {
			out = append(out, l)
		}
	}
	return out
}

// linesNotIn counts a's lines that b lacks, and gives the first.
func linesNotIn(a, b string) (n int, first string) {
	extra := extraLines(a, b)
	if len(extra) == 0 {
		return 0, ""
	}
	return len(extra), extra[0]
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// cpuSeconds is the user+system time of pid and its reaped children.
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	var t float64
	for _, i := range []int{11, 12, 13, 14} { // utime stime cutime cstime
		v, _ := strconv.ParseFloat(f[i], 64)
		t += v
	}
	return t / 100 // USER_HZ
}

// startLsyncd runs lsyncd in nodeA's namespace, mirroring nodeA's tree to
// the rsync daemon in nodeB's with the shortest delay it takes; it returns
// its pid and a stop function. Its startup rsync is waited for.
func (b *bench) startLsyncd() (int, func()) {
	conf := filepath.Join(b.lab, "lsyncd.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf(`settings { nodaemon = true, logfile = %q, statusFile = %q, insist = true, maxProcesses = 4 }
sync { default.rsync, source = %q, target = "rsync://10.250.0.2:8873/data/", delay = 0,
  rsync = { archive = true, _extra = { "--inplace", "--no-whole-file" } } }
`, filepath.Join(b.lab, "lsyncd.log"), filepath.Join(b.lab, "lsyncd.status"), filepath.Join(b.lab, "a/data")+"/")), 0o644)
	cmd := exec.Command("ip", "netns", "exec", "duet-a", "lsyncd", conf)
	if err := cmd.Start(); err != nil {
		fail("lsyncd: " + err.Error())
	}
	b.waitSame("", 2*time.Minute)
	return cmd.Process.Pid, func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}
}

// lsyncdFigures runs the small-files and steady-writer workloads with
// lsyncd (rsync to a daemon in nodeB's namespace) instead of duet: the
// time until nodeB has everything, the bytes nodeA's veth sent, and the
// CPU the replication took (lsyncd and its rsyncs; duet's daemon).
func (b *bench) lsyncdFigures(runs int) []Figure {
	for _, tool := range []string{"lsyncd", "rsync"} {
		if _, err := exec.LookPath(tool); err != nil {
			fail(tool + " not installed (apt-get install lsyncd rsync): the lsyncd figures need it")
		}
	}
	n, secs := 3000, 10
	if b.quick {
		n, secs = 300, 3
	}
	tarball := filepath.Join(os.TempDir(), "duet-bench-small.tar")
	if _, err := makeTarball(tarball, n); err != nil {
		fail("tarball: " + err.Error())
	}
	defer os.Remove(tarball)
	smallT := Figure{Name: fmt.Sprintf("small files (tar x of %d files + git commit): time until nodeB has it all, duet / lsyncd", n),
		Target: "≤ 1.0", Unit: "s"}
	smallW := Figure{Name: "same, bytes nodeA's veth sent, duet / lsyncd", Target: "≤ 1.0", Unit: "bytes"}
	smallC := Figure{Name: "same, CPU seconds of the replication (duet's daemon / lsyncd and its rsyncs)", Target: "(context)", Met: true, Unit: "s"}
	lagF := Figure{Name: fmt.Sprintf("steady 20 MB/s writer (fio, %d s): time from its end until nodeB's copy is identical, duet / lsyncd", secs),
		Target: "≤ 1.0", Unit: "s"}
	work := func(dir string) { smallWork(tarball, dir) }
	writer := func(file string) {
		out, err := exec.Command("fio", "--name=steady", "--filename="+file, "--rw=write", "--bs=64k", "--size=1g",
			"--rate=20m", "--time_based", "--runtime="+strconv.Itoa(secs), "--ioengine=psync").CombinedOutput()
		if err != nil {
			fail(fmt.Sprintf("fio: %v\n%s", err, out))
		}
	}
	for i := range runs {
		rel := fmt.Sprintf("ls-small-%d", i)
		// duet
		b.waitSync()
		settle()
		tx0, cpu0 := vethTX(b), cpuSeconds(b.pid("a"))
		t0 := time.Now()
		work(filepath.Join(b.lab, "a/data", rel))
		b.waitSync()
		dt := time.Since(t0).Seconds()
		dw, dc := float64(vethTX(b)-tx0), cpuSeconds(b.pid("a"))-cpu0
		lagFile := filepath.Join(b.lab, "a/data", fmt.Sprintf("ls-lag-%d", i))
		writer(lagFile)
		t0 = time.Now()
		b.waitSync()
		dl := time.Since(t0).Seconds()
		os.RemoveAll(filepath.Join(b.lab, "a/data", rel))
		os.Remove(lagFile)
		b.waitSync()

		// lsyncd, duet stopped
		b.stopPair()
		stopRsync := b.rsyncDaemon()
		pid, stopL := b.startLsyncd()
		settle()
		tx0, cpu0 = vethTX(b), cpuSeconds(pid)
		t0 = time.Now()
		work(filepath.Join(b.lab, "a/data", rel))
		// The times waitSame returns, not the time until it returned: a
		// delete lsyncd missed makes it wait on (see waitSame). The bytes
		// and CPU are read after, an idle wait's worth more.
		lt := (time.Since(t0) + b.waitSame(rel, 2*time.Minute)).Seconds()
		lw, lc := float64(vethTX(b)-tx0), cpuSeconds(pid)-cpu0
		writer(lagFile)
		ll := b.waitSame("", 2*time.Minute).Seconds()
		os.RemoveAll(filepath.Join(b.lab, "a/data", rel))
		os.Remove(lagFile)
		b.waitSame("", 2*time.Minute)
		stopL()
		stopRsync()
		b.must("start", "a")
		b.waitServing()
		b.must("start", "b")
		b.waitSync()

		smallT.add(lt, dt)
		smallW.add(lw, dw)
		smallC.add(lc, dc)
		lagF.add(ll, dl)
	}
	smallT.Met, smallW.Met, lagF.Met = median(smallT.Ratio) <= 1, median(smallW.Ratio) <= 1, median(lagF.Ratio) <= 1
	note := "lsyncd 2.2 (delay 0, rsync --inplace --no-whole-file to an rsync daemon in nodeB's namespace) with duet stopped; duet with lsyncd stopped; bytes are nodeA's veth tx counter (TCP/IP included) for both"
	if len(b.lsyncdMissed) > 0 {
		note += "; deletes lsyncd missed (its time counted to when nodeB held every file of nodeA's, as nodeA had it, beside entries nodeA no longer had): " + strings.Join(b.lsyncdMissed, "; ")
	}
	smallT.Note, lagF.Note = note, note
	b.plots.bars = append(b.plots.bars, barChart{file: "lsyncd.png",
		title: "duet / lsyncd (median ratios; below 1: duet does better)", unit: "ratio",
		labels: []string{"small files\ntime", "small files\nbytes", "small files\nCPU", "20 MB/s writer\ncatch-up"},
		values: []float64{median(smallT.Ratio), median(smallW.Ratio), median(smallC.Ratio), median(lagF.Ratio)}})
	return []Figure{smallT, smallW, smallC, lagF}
}
