//go:build !linux

package exceptions

import "time"

// threadCPU is unavailable here; the cpu-ns metrics then read 0.
func threadCPU() time.Duration { return 0 }

// processHuge is not known outside Linux.
func processHuge() int { return -1 }
