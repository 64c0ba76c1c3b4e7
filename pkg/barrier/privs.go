package barrier

// The supervisor runs as root with every capability and acts for its
// callers on their own descriptors: what it does must pass the checks the
// kernel would make of the caller, or not be done for it.

import (
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Capability bits the supervisor asks about.
const (
	capFsetid = 4
)

// callerCaps reads pid's effective capabilities, and whether pid is in the
// supervisor's user namespace (a caller's capabilities in a namespace of
// its own are not the host's).
func callerCaps(pid int) (eff uint64, sameNS bool, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, false, err
	}
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			if eff, err = strconv.ParseUint(strings.TrimSpace(v), 16, 64); err != nil {
				return 0, false, err
			}
			found = true
			break
		}
	}
	if !found {
		return 0, false, fmt.Errorf("/proc/%d/status: no CapEff", pid)
	}
	theirs, err1 := os.Readlink(fmt.Sprintf("/proc/%d/ns/user", pid))
	ours, err2 := os.Readlink("/proc/self/ns/user")
	return eff, err1 == nil && err2 == nil && theirs == ours, nil
}

// supervisorCaps is the supervisor's own effective set: the calling
// thread's, which every thread of the supervisor shares but those that
// took on a caller's identity (openAs), which never run anything else.
// Not /proc/self/status: it shows the main thread's, and a goroutine that
// took on a caller's identity may have ended there, leaving that thread
// with the caller's fewer capabilities (the race detector's runs of
// TestOpenByHandleSyncKeepsCallersPermissionChecks, after other tests'
// opens, saw the supervisor no more privileged than a reduced caller).
func supervisorCaps() (uint64, error) {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return 0, err
	}
	return uint64(data[0].Effective) | uint64(data[1].Effective)<<32, nil
}

// asPrivilegedAs reports whether pid, running as root, holds every
// capability the supervisor holds, in the supervisor's user namespace: an
// open the supervisor makes for it with those capabilities then passes
// no check the kernel would have refused it. A root service run with a
// reduced set (a unit's CapabilityBoundingSet) is not
// (TestOpenByHandleSyncKeepsCallersPermissionChecks, from a review).
func asPrivilegedAs(pid int) bool {
	theirs, same, err := callerCaps(pid)
	if err != nil || !same {
		return false
	}
	ours, err := supervisorCaps()
	return err == nil && ours&^theirs == 0
}

// killPrivs clears the setuid bit, and the setgid bit of a group
// executable or of a file whose group pid is not in, of the regular file
// fd before the supervisor writes into it
// for pid, when pid could not keep them (no CAP_FSETID in the host's
// namespace): the kernel does so on a write by such a process, and the
// supervisor's own write, made with CAP_FSETID, would leave a setuid-root
// program holding the caller's bytes (TestKernelCopyByUnprivilegedCallerDropsSetuid,
// from a review).
func killPrivs(fd, pid int) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil
	}
	kill := uint32(0)
	if st.Mode&unix.S_ISUID != 0 {
		kill |= unix.S_ISUID
	}
	if st.Mode&unix.S_ISGID != 0 && (st.Mode&unix.S_IXGRP != 0 || !inGroup(pid, st.Gid)) {
		// As the kernel's setattr_should_drop_sgid: a group executable,
		// or a writer outside the file's group.
		kill |= unix.S_ISGID
	}
	if kill == 0 {
		return nil
	}
	if eff, same, err := callerCaps(pid); err == nil && same && eff&(1<<capFsetid) != 0 {
		return nil
	}
	return unix.Fchmod(fd, st.Mode&0o7777&^kill)
}

// inGroup reports whether pid's filesystem group or one of its groups is
// gid (false if they cannot be read: the bit is cleared, as for a stranger).
func inGroup(pid int, gid uint32) bool {
	c, err := credsOf(pid)
	if err != nil {
		return false
	}
	if uint32(c.gid) == gid {
		return true
	}
	for _, g := range c.groups {
		if g == gid {
			return true
		}
	}
	return false
}
