// Package threads lists what this process's threads are doing, for tests
// that check a wait holds no thread (and so none of the Go runtime's Ps)
// in a system call.
package threads

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// InSyscallOn lists this process's threads that are in a system call
// whose first argument is fd and, if nrs is not empty, whose number is
// one of nrs (/proc/self/task/*/syscall: the number, then the arguments
// in hex). Each is "tid (syscall nr)".
func InSyscallOn(fd int, nrs ...int) ([]string, error) {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, task := range tasks {
		b, err := os.ReadFile(filepath.Join("/proc/self/task", task.Name(), "syscall"))
		if err != nil {
			continue // the thread ended
		}
		f := strings.Fields(string(b))
		if len(f) < 2 {
			continue // "running"
		}
		nr, err := strconv.Atoi(f[0])
		if err != nil || nr < 0 || (len(nrs) > 0 && !slices.Contains(nrs, nr)) {
			continue
		}
		if arg, err := strconv.ParseUint(strings.TrimPrefix(f[1], "0x"), 16, 64); err == nil && arg == uint64(fd) {
			out = append(out, task.Name()+" (syscall "+f[0]+")")
		}
	}
	return out, nil
}
