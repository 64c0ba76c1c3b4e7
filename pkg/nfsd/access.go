package nfsd

import (
	"os"

	"github.com/duet-ha/duet/pkg/fstree"
	"golang.org/x/sys/unix"
)

// ACCESS3 bits (RFC 1813).
const (
	accessRead    = 0x01
	accessLookup  = 0x02
	accessModify  = 0x04
	accessExtend  = 0x08
	accessDelete  = 0x10
	accessExecute = 0x20
)

// accessNeeds is the access(2) mode each ACCESS3 bit needs, on a
// directory and on anything else, as knfsd has them: deleting is asked
// of the directory, and a file has nothing to look up.
var accessNeeds = []struct {
	bit, dir, other uint32
}{
	{accessRead, unix.R_OK, unix.R_OK},
	{accessLookup, unix.X_OK, 0},
	{accessModify, unix.W_OK | unix.X_OK, unix.W_OK},
	{accessExtend, unix.W_OK | unix.X_OK, unix.W_OK},
	{accessDelete, unix.W_OK | unix.X_OK, 0},
	{accessExecute, unix.X_OK, unix.X_OK},
}

// accessGranted returns the bits of asked that may grants, may saying
// whether the caller has an access(2) mode on the object.
func accessGranted(dir bool, asked uint32, may func(mode uint32) bool) uint32 {
	var granted uint32
	for _, n := range accessNeeds {
		need := n.other
		if dir {
			need = n.dir
		}
		if asked&n.bit != 0 && need != 0 && may(need) {
			granted |= n.bit
		}
	}
	return granted
}

// access returns the ACCESS3 bits of asked that c has on the object fh
// names, and its path. The kernel decides (faccessat2 with AT_EACCESS,
// as c), with search permission on the object's directory, as the calls
// themselves are checked (fsys.openAs).
func (h *Handler) access(c *cred, fh []byte, asked uint32) (uint32, string, error) {
	path, err := h.pathOf(fh)
	if err != nil {
		return 0, "", err
	}
	s := h.fs
	if err := s.enter(); err != nil {
		return 0, "", err
	}
	defer s.leave()
	s.ix.tmu.RLock()
	defer s.ix.tmu.RUnlock()
	comps, err := s.real(path)
	if err != nil {
		return 0, "", err
	}
	dir, name := s.root, "."
	if n := len(comps); n > 0 {
		d, err := fstree.OpenBeneath(s.root, join(comps[:n-1]), unix.O_PATH|unix.O_DIRECTORY)
		if err != nil {
			return 0, "", err
		}
		defer d.Close()
		dir, name = d, comps[n-1]
	}
	var st unix.Stat_t
	if err := unix.Fstatat(int(dir.Fd()), name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return 0, "", &os.PathError{Op: "access", Path: path, Err: err}
	}
	var granted uint32
	err = c.as(func() error {
		granted = accessGranted(st.Mode&unix.S_IFMT == unix.S_IFDIR, asked, func(mode uint32) bool {
			return unix.Faccessat2(int(dir.Fd()), name, mode, unix.AT_EACCESS|unix.AT_SYMLINK_NOFOLLOW) == nil
		})
		return nil
	})
	return granted, path, err
}
