package dev.phonekit.sample.bundle

import android.app.ActivityManager
import android.content.Context
import kotlin.math.abs

/** What Android reports about this phone's memory (ActivityManager.MemoryInfo), in bytes. */
data class DeviceMemory(
    val totalBytes: Long,
    val availableBytes: Long,
    val thresholdBytes: Long,
    val lowMemory: Boolean,
) {
    /**
     * What an app can still take before the low-memory killer starts reclaiming: Android has
     * no per-app cap for native memory, lmkd acts once availMem falls to the threshold.
     */
    val headroomBytes: Long get() = (availableBytes - thresholdBytes).coerceAtLeast(0)

    companion object {
        fun read(context: Context): DeviceMemory {
            val manager = context.getSystemService(ActivityManager::class.java)
            val info = ActivityManager.MemoryInfo()
            manager.getMemoryInfo(info)
            return DeviceMemory(info.totalMem, info.availMem, info.threshold, info.lowMemory)
        }
    }
}

enum class Fit {
    /** Within the bundle's budget (a fraction of this phone's memory) and the free memory. */
    FITS,

    /** Over the budget policy but the phone has the memory right now: warn, load on request. */
    OVER_BUDGET,

    /** More than the phone can give without killing other apps: refuse. */
    OVER_AVAILABLE,
}

data class BudgetCheck(
    val format: String,
    val estimateBytes: Long,
    /** True when the bundle carries phonekit's per-format estimate, false for the file-size floor. */
    val estimated: Boolean,
    val budgetFraction: Double,
    val budgetBytes: Long,
    val memory: DeviceMemory,
    val fit: Fit,
    /** The exported verdict whose device has the most similar memory, for reference. */
    val nearestProfile: Verdict?,
)

/** Default of `phonekit export --budget-fraction`: the MobileLLM paper's 10 % of DRAM rule. */
const val DEFAULT_BUDGET_FRACTION = 0.10

/**
 * Judges [artifact] on this phone. The bundle's verdicts were computed for named device
 * profiles; this phone may be none of them, so the estimate (which depends on the bundle, not
 * on the device) is compared with this phone's own budget and free memory.
 */
fun checkBudget(manifest: BundleManifest, artifact: Artifact, memory: DeviceMemory): BudgetCheck {
    val verdicts = manifest.budget?.verdicts.orEmpty().filter { it.format == artifact.format }
    val estimate = verdicts.maxOfOrNull { it.estimateBytes }
    // Without an estimate the files themselves are a lower bound on what loading takes.
    val bytes = estimate ?: artifact.bytes
    val fraction = manifest.budget?.budgetFraction ?: DEFAULT_BUDGET_FRACTION
    val budget = (fraction * memory.totalBytes).toLong()
    val fit = when {
        bytes > memory.headroomBytes -> Fit.OVER_AVAILABLE
        bytes > budget -> Fit.OVER_BUDGET
        else -> Fit.FITS
    }
    val nearest = verdicts.filter { it.dramBytes != null }.minByOrNull { abs(it.dramBytes!! - memory.totalBytes) }
    return BudgetCheck(artifact.format, bytes, estimate != null, fraction, budget, memory, fit, nearest)
}
