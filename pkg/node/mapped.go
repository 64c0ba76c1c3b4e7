package node

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/duet-ha/duet/pkg/capture"
	"golang.org/x/sys/unix"
)

// A store through a shared mapping is seen when it dirties a clean page
// (the page fault: writeback_dirty_folio), and a mapping made while the
// capture runs is reported whole (sys_enter_mmap), so that its pages are
// written back and any later store faults. A mapping made before the
// capture attached (by a process duet does not supervise, before a
// takeover or a restart of the daemon) got neither: stores into a page it
// had already dirtied fault no more, no hook saw them, and nothing read
// the file (a fresh-context review, fortieth session:
// TestMappedBeforeAttachReported). mappedFiles finds them when the
// capture attaches, for the record sys_enter_mmap would have given.

// mappedFiles calls report with a whole-file mmap record for every file
// on one of devs (stat's encoding) that some process maps shared and
// writable, once per file. It returns how many it reported.
func mappedFiles(devs []uint64, report func(*capture.Record)) int {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	watched := map[uint64]bool{}
	for _, d := range devs {
		watched[d] = true
	}
	seen := map[capture.InodeKey]bool{}
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		for _, r := range sharedWritable(pid) {
			st, size, ok := statMapped(pid, r)
			if !ok || !watched[st.Dev] {
				continue
			}
			k := capture.InodeKey{Dev: capture.KernelDev(st.Dev), Ino: st.Ino}
			if seen[k] {
				continue
			}
			seen[k] = true
			// Seq 0: as of the attach, before any record of the ring.
			report(&capture.Record{Dev: k.Dev, Ino: k.Ino, Kind: capture.KindMmap, Pos: 0, Len: uint64(max(size, 0))})
		}
	}
	return len(seen)
}

// sharedWritable lists the address ranges ("start-end") of pid's shared
// writable file mappings.
func sharedWritable(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		return nil
	}
	var out []string
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		// "7f..-7f.. rw-s 00000000 fd:01 1234  /path"
		f := strings.Fields(sc.Text())
		if len(f) < 6 || len(f[1]) < 4 || f[1][1] != 'w' || f[1][3] != 's' || f[4] == "0" {
			continue
		}
		out = append(out, f[0])
	}
	return out
}

// statMapped stats the file of pid's mapping r through map_files (the
// file itself, whatever its name now), and reads its size.
func statMapped(pid int, r string) (unix.Stat_t, int64, bool) {
	var st unix.Stat_t
	if err := unix.Stat(filepath.Join("/proc", strconv.Itoa(pid), "map_files", r), &st); err != nil {
		return st, 0, false
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return st, 0, false
	}
	return st, st.Size, true
}
