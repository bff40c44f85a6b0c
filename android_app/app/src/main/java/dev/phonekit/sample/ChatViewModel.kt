package dev.phonekit.sample

import android.app.Application
import android.os.SystemClock
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import dev.phonekit.sample.bundle.BudgetCheck
import dev.phonekit.sample.bundle.BundleException
import dev.phonekit.sample.bundle.BundleStore
import dev.phonekit.sample.bundle.DeviceMemory
import dev.phonekit.sample.bundle.Fit
import dev.phonekit.sample.bundle.LocalBundle
import dev.phonekit.sample.bundle.checkBudget
import dev.phonekit.sample.bundle.verifyBundle
import dev.phonekit.sample.engine.ChatEngine
import dev.phonekit.sample.engine.ChatEngines
import dev.phonekit.sample.engine.ChatFormat
import dev.phonekit.sample.engine.ChatMessage
import dev.phonekit.sample.engine.GenerationStats
import kotlinx.coroutines.CancellationException
import kotlinx.coroutines.Dispatchers
import kotlinx.coroutines.Job
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.asStateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.runBlocking
import kotlinx.coroutines.withContext

enum class Phase { BROWSING, DETAILS, VERIFYING, LOADING, CHAT }

data class UiState(
    val phase: Phase = Phase.BROWSING,
    val bundles: List<LocalBundle> = emptyList(),
    val selected: LocalBundle? = null,
    val format: String? = null,
    val budget: BudgetCheck? = null,
    /** Set while the user must confirm loading a bundle that is over its budget. */
    val confirmOverBudget: Boolean = false,
    val verifyProgress: Float = 0f,
    val error: String? = null,
    val engineLabel: String? = null,
    val templateNote: String? = null,
    val messages: List<ChatMessage> = emptyList(),
    val streaming: String = "",
    val generating: Boolean = false,
    val liveTokensPerSecond: Double? = null,
    val lastStats: GenerationStats? = null,
)

/** The formats this app can run, in the order it prefers them. */
val ANDROID_FORMATS = listOf("pte", "onnx")

const val MAX_NEW_TOKENS = 256

class ChatViewModel(application: Application) : AndroidViewModel(application) {
    private val _state = MutableStateFlow(UiState())
    val state: StateFlow<UiState> = _state.asStateFlow()

    private var engine: ChatEngine? = null
    private var generation: Job? = null

    init {
        refresh()
    }

    fun refresh() {
        viewModelScope.launch {
            val bundles = withContext(Dispatchers.IO) { BundleStore.list(getApplication()) }
            _state.update { it.copy(bundles = bundles) }
        }
    }

    fun select(bundle: LocalBundle) {
        val manifest = bundle.manifest ?: return
        val format = ANDROID_FORMATS.firstOrNull { manifest.artifact(it) != null }
        _state.update { it.copy(phase = Phase.DETAILS, selected = bundle, error = null, format = format) }
        format?.let { selectFormat(it) }
    }

    fun selectFormat(format: String) {
        val manifest = _state.value.selected?.manifest ?: return
        val artifact = manifest.artifact(format) ?: return
        val budget = checkBudget(manifest, artifact, DeviceMemory.read(getApplication()))
        _state.update { it.copy(format = format, budget = budget, error = null) }
    }

    /** Verifies the sha256s, then loads; an over-budget bundle needs [force] (the user's yes). */
    fun load(force: Boolean = false) {
        val s = _state.value
        val bundle = s.selected ?: return
        val manifest = bundle.manifest ?: return
        val artifact = s.format?.let { manifest.artifact(it) } ?: return
        val budget = s.budget ?: return
        when {
            budget.fit == Fit.OVER_AVAILABLE -> {
                _state.update { it.copy(error = "Refused: this phone has ${mb(budget.memory.headroomBytes)} free before Android starts killing apps, the bundle needs about ${mb(budget.estimateBytes)}. Close other apps or export a smaller bundle (stronger --quant or shorter --context).") }
                return
            }
            budget.fit == Fit.OVER_BUDGET && !force -> {
                _state.update { it.copy(confirmOverBudget = true) }
                return
            }
        }
        _state.update { it.copy(confirmOverBudget = false, phase = Phase.VERIFYING, verifyProgress = 0f, error = null) }
        viewModelScope.launch {
            try {
                withContext(Dispatchers.IO) {
                    verifyBundle(bundle.dir, manifest, artifact) { done, total ->
                        _state.update { it.copy(verifyProgress = if (total == 0L) 1f else done.toFloat() / total) }
                    }
                }
                _state.update { it.copy(phase = Phase.LOADING) }
                val opened = withContext(Dispatchers.Default) {
                    val candidate = ChatEngines.open(bundle.dir, manifest, artifact)
                    try {
                        candidate.load()
                    } catch (t: Throwable) {
                        candidate.close()
                        throw t
                    }
                    candidate
                }
                engine = opened
                val format = ChatFormat(manifest.tokenizer.chatTemplate)
                val note = when {
                    manifest.tokenizer.chatTemplate == null -> "No chat template in this bundle (a base model): your text is continued as is."
                    format.unsupportedTemplate -> "The chat template is not ChatML; this app sends your text without it."
                    else -> null
                }
                _state.update { it.copy(phase = Phase.CHAT, engineLabel = opened.label, templateNote = note, messages = emptyList()) }
            } catch (e: CancellationException) {
                throw e
            } catch (e: BundleException) {
                _state.update { it.copy(phase = Phase.DETAILS, error = e.message) }
            } catch (t: Throwable) {
                // Runtime failures arrive here: a .pte from a newer ExecuTorch, a missing kernel,
                // or native libraries missing for this phone's ABI (UnsatisfiedLinkError).
                _state.update { it.copy(phase = Phase.DETAILS, error = "Loading failed: ${t.message ?: t.javaClass.simpleName}") }
            }
        }
    }

    fun dismissOverBudget() {
        _state.update { it.copy(confirmOverBudget = false) }
    }

    fun send(text: String) {
        val e = engine ?: return
        if (text.isBlank() || _state.value.generating) return
        val manifest = _state.value.selected?.manifest ?: return
        val messages = _state.value.messages + ChatMessage("user", text.trim())
        val prompt = ChatFormat(manifest.tokenizer.chatTemplate).render(messages)
        _state.update { it.copy(messages = messages, streaming = "", generating = true, liveTokensPerSecond = null, error = null) }
        generation = viewModelScope.launch(Dispatchers.Default) {
            var pieces = 0
            var first = 0L
            try {
                val stats = e.generate(prompt, MAX_NEW_TOKENS) { piece ->
                    val now = SystemClock.elapsedRealtime()
                    if (pieces == 0) first = now
                    pieces++
                    // Live rate over the decode so far (the first piece ends the prefill).
                    val live = if (pieces > 1 && now > first) (pieces - 1) * 1000.0 / (now - first) else null
                    _state.update { it.copy(streaming = it.streaming + piece, liveTokensPerSecond = live ?: it.liveTokensPerSecond) }
                }
                _state.update {
                    it.copy(
                        messages = it.messages + ChatMessage("assistant", it.streaming),
                        streaming = "",
                        generating = false,
                        lastStats = stats,
                    )
                }
            } catch (ex: CancellationException) {
                throw ex
            } catch (ex: Throwable) {
                _state.update { it.copy(generating = false, streaming = "", error = "Generation failed: ${ex.message ?: ex.javaClass.simpleName}") }
            }
        }
    }

    fun stop() {
        engine?.stop()
    }

    /** Back to the bundle list; the engine is closed only after a running generation returned. */
    fun unload() {
        val e = engine
        engine = null
        viewModelScope.launch {
            e?.stop()
            generation?.join()
            withContext(Dispatchers.Default) { e?.close() }
            _state.update { UiState(bundles = it.bundles) }
            refresh()
        }
    }

    fun back() {
        _state.update { it.copy(phase = Phase.BROWSING, selected = null, budget = null, error = null) }
    }

    override fun onCleared() {
        val e = engine ?: return
        engine = null
        e.stop()
        val running = generation
        // The scope is cancelled now, but a native generate() returns only after stop();
        // closing the runtime under it would crash, so close once it has returned.
        Thread {
            runBlocking { running?.join() }
            e.close()
        }.start()
    }
}

fun mb(bytes: Long): String = "%.0f MB".format(bytes / 1e6)
