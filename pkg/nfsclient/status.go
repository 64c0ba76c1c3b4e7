package nfsclient

import (
	"errors"
	"fmt"
)

// NFSv3 statuses (nfsstat3, RFC 1813 section 2.6). MOUNT's mountstat3
// shares the numbers it has (NOENT, ACCES, NOTDIR...).
const (
	StatusOK          = 0
	StatusPerm        = 1
	StatusNoEnt       = 2
	StatusIO          = 5
	StatusNXIO        = 6
	StatusAccess      = 13
	StatusExist       = 17
	StatusXDev        = 18
	StatusNoDev       = 19
	StatusNotDir      = 20
	StatusIsDir       = 21
	StatusInval       = 22
	StatusFBig        = 27
	StatusNoSpc       = 28
	StatusROFS        = 30
	StatusMLink       = 31
	StatusNameTooLong = 63
	StatusNotEmpty    = 66
	StatusDQuot       = 69
	StatusStale       = 70
	StatusRemote      = 71
	StatusBadHandle   = 10001
	StatusNotSync     = 10002
	StatusBadCookie   = 10003
	StatusNotSupp     = 10004
	StatusTooSmall    = 10005
	StatusServerFault = 10006
	StatusBadType     = 10007
	StatusJukebox     = 10008
)

var statusNames = map[uint32]string{
	StatusPerm: "PERM", StatusNoEnt: "NOENT", StatusIO: "IO", StatusNXIO: "NXIO",
	StatusAccess: "ACCES", StatusExist: "EXIST", StatusXDev: "XDEV", StatusNoDev: "NODEV",
	StatusNotDir: "NOTDIR", StatusIsDir: "ISDIR", StatusInval: "INVAL", StatusFBig: "FBIG",
	StatusNoSpc: "NOSPC", StatusROFS: "ROFS", StatusMLink: "MLINK",
	StatusNameTooLong: "NAMETOOLONG", StatusNotEmpty: "NOTEMPTY", StatusDQuot: "DQUOT",
	StatusStale: "STALE", StatusRemote: "REMOTE", StatusBadHandle: "BADHANDLE",
	StatusNotSync: "NOT_SYNC", StatusBadCookie: "BAD_COOKIE", StatusNotSupp: "NOTSUPP",
	StatusTooSmall: "TOOSMALL", StatusServerFault: "SERVERFAULT", StatusBadType: "BADTYPE",
	StatusJukebox: "JUKEBOX",
}

// StatusError is a reply with a status other than OK: the server did
// the call and refused it. It is never retried.
type StatusError struct {
	Proc   string // the procedure, as "WRITE", or "MNT" for a mount
	Status uint32
}

func (e *StatusError) Error() string {
	prefix := "NFS3ERR_"
	if e.Proc == "MNT" {
		prefix = "MNT3ERR_"
	}
	name, ok := statusNames[e.Status]
	if !ok {
		name = "unknown status"
		prefix = ""
	}
	return fmt.Sprintf("%s: %s%s (%d)", e.Proc, prefix, name, e.Status)
}

// StatusOf returns the status of a StatusError in err's chain.
func StatusOf(err error) (uint32, bool) {
	var se *StatusError
	if errors.As(err, &se) {
		return se.Status, true
	}
	return 0, false
}

// IsStale says whether err is an NFS3ERR_STALE reply: the handle names
// no file the server holds — what a Linux client reports as ESTALE.
func IsStale(err error) bool {
	st, ok := StatusOf(err)
	return ok && st == StatusStale
}
