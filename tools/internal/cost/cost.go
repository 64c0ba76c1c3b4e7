// Package cost is what tools/syncbench reports a process used during its
// timed calls, and what tools/bench reads of it: one type on both ends
// of that JSON.
package cost

// Proc is what one process used during a run's timed calls.
type Proc struct {
	Name       string  `json:"name"`
	CPUSeconds float64 `json:"cpu_s"`
	// WaitSeconds is how long its threads were runnable and waited for
	// a CPU.
	WaitSeconds float64 `json:"runq_wait_s"`
	// Switches are its threads' context switches, voluntary or not.
	Switches uint64 `json:"switches"`
}
