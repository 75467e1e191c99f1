//! Thread priority: the bulk CPU work (inspection, learning) yields to the threads that move verdicts.

/// Niceness of inspection threads (and the encoder threads they start): the bulk CPU work yields to
/// the threads that move verdicts (MQTT, outbox, HTTP), so a busy box still publishes promptly.
pub const INSPECTION_NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority by [`INSPECTION_NICE`] (Linux: per thread).
pub fn yield_to_io() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and setpriority take no pointers; on Linux PRIO_PROCESS with a thread id
        // applies to that thread only. Raising niceness needs no privilege; a failure changes nothing.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let now = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, (now + INSPECTION_NICE).min(19));
        }
    }
}
