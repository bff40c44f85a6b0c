import Foundation
import os

/// This phone's memory as iOS reports it, in bytes.
struct DeviceMemory: Sendable {
    /// ProcessInfo.physicalMemory: the DRAM the device has.
    let physicalBytes: Int
    /// os_proc_available_memory(): how much more this process may allocate before iOS ends
    /// it (jetsam). It already reflects the increased-memory-limit entitlement when granted.
    /// 0 where iOS does not report it (the Simulator).
    let availableBytes: Int

    static func read() -> DeviceMemory {
        DeviceMemory(
            physicalBytes: Int(ProcessInfo.processInfo.physicalMemory),
            availableBytes: Int(os_proc_available_memory())
        )
    }
}

enum Fit: Sendable {
    /// Within the bundle's budget (a fraction of this phone's memory) and the app's limit.
    case fits
    /// Over the budget policy but under this app's limit: warn, load on request.
    case overBudget
    /// Over what iOS lets this app allocate: loading would get the app killed, so refuse.
    case overAvailable
}

struct BudgetCheck: Sendable {
    let format: String
    let estimateBytes: Int
    /// True when the bundle carries phonekit's per-format estimate, false for the file-size floor.
    let estimated: Bool
    let budgetFraction: Double
    let budgetBytes: Int
    let memory: DeviceMemory
    let fit: Fit
    /// The exported verdict whose device has the most similar memory, for reference.
    let nearestProfile: Verdict?
}

/// Default of `phonekit export --budget-fraction`: the MobileLLM paper's 10 % of DRAM rule.
let defaultBudgetFraction = 0.10

/// Judges `artifact` on this phone. The bundle's verdicts were computed for named device
/// profiles; the estimate depends on the bundle, not the device, so it is compared with this
/// phone's own budget and with what iOS lets this process allocate.
func checkBudget(_ manifest: BundleManifest, _ artifact: Artifact, _ memory: DeviceMemory) -> BudgetCheck {
    let verdicts = (manifest.budget?.verdicts ?? []).filter { $0.format == artifact.format }
    let estimate = verdicts.map(\.estimateBytes).max()
    // Without an estimate the files themselves are a lower bound on what loading takes.
    let bytes = estimate ?? artifact.bytes
    let fraction = manifest.budget?.budgetFraction ?? defaultBudgetFraction
    let budget = Int(fraction * Double(memory.physicalBytes))
    let fit: Fit
    if memory.availableBytes > 0 && bytes > memory.availableBytes {
        fit = .overAvailable
    } else if bytes > budget {
        fit = .overBudget
    } else {
        fit = .fits
    }
    let nearest = verdicts
        .filter { $0.dramBytes != nil }
        .min { abs($0.dramBytes! - memory.physicalBytes) < abs($1.dramBytes! - memory.physicalBytes) }
    return BudgetCheck(
        format: artifact.format, estimateBytes: bytes, estimated: estimate != nil, budgetFraction: fraction,
        budgetBytes: budget, memory: memory, fit: fit, nearestProfile: nearest
    )
}

func megabytes(_ bytes: Int) -> String {
    String(format: "%.0f MB", Double(bytes) / 1e6)
}
