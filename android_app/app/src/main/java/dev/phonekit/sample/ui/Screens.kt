package dev.phonekit.sample.ui

import androidx.activity.compose.BackHandler
import androidx.compose.foundation.clickable
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.PaddingValues
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.imePadding
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.width
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.foundation.lazy.rememberLazyListState
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.AlertDialog
import androidx.compose.material3.Button
import androidx.compose.material3.Card
import androidx.compose.material3.CircularProgressIndicator
import androidx.compose.material3.ExperimentalMaterial3Api
import androidx.compose.material3.FilterChip
import androidx.compose.material3.LinearProgressIndicator
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Scaffold
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.material3.TopAppBar
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.Color
import androidx.compose.ui.text.font.FontFamily
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import dev.phonekit.sample.ANDROID_FORMATS
import dev.phonekit.sample.ChatViewModel
import dev.phonekit.sample.Phase
import dev.phonekit.sample.UiState
import dev.phonekit.sample.bundle.BudgetCheck
import dev.phonekit.sample.bundle.Fit
import dev.phonekit.sample.bundle.LocalBundle
import dev.phonekit.sample.mb

@OptIn(ExperimentalMaterial3Api::class)
@Composable
fun PhonekitChatApp(viewModel: ChatViewModel) {
    val state by viewModel.state.collectAsStateWithLifecycle()
    val title = state.selected?.manifest?.model?.id ?: "phonekit Chat"
    Scaffold(topBar = { TopAppBar(title = { Text(title) }) }) { padding ->
        Column(Modifier.padding(padding).fillMaxSize().imePadding()) {
            when (state.phase) {
                Phase.BROWSING -> BundleList(state.bundles, onPick = viewModel::select, onRefresh = viewModel::refresh)
                Phase.DETAILS, Phase.VERIFYING, Phase.LOADING -> {
                    BackHandler(enabled = state.phase == Phase.DETAILS) { viewModel.back() }
                    BundleDetails(state, onFormat = viewModel::selectFormat, onLoad = { viewModel.load() })
                }
                Phase.CHAT -> {
                    BackHandler { viewModel.unload() }
                    Chat(state, onSend = viewModel::send, onStop = viewModel::stop)
                }
            }
        }
    }
    if (state.confirmOverBudget) {
        val budget = state.budget
        AlertDialog(
            onDismissRequest = viewModel::dismissOverBudget,
            title = { Text("Over this phone's budget") },
            text = {
                Text(
                    "The bundle needs about ${mb(budget?.estimateBytes ?: 0)}, over its budget of " +
                        "${mb(budget?.budgetBytes ?: 0)} (${pct(budget?.budgetFraction)} of this phone's memory). " +
                        "It fits in the free memory now, but Android may close other apps or this one.",
                )
            },
            confirmButton = { TextButton(onClick = { viewModel.load(force = true) }) { Text("Load anyway") } },
            dismissButton = { TextButton(onClick = viewModel::dismissOverBudget) { Text("Cancel") } },
        )
    }
}

@Composable
private fun BundleList(bundles: List<LocalBundle>, onPick: (LocalBundle) -> Unit, onRefresh: () -> Unit) {
    Column(Modifier.padding(16.dp), verticalArrangement = Arrangement.spacedBy(12.dp)) {
        if (bundles.isEmpty()) {
            Text("No bundles yet. On your computer run:", style = MaterialTheme.typography.bodyLarge)
            Text("phonekit push android BUNDLE_FOLDER", fontFamily = FontFamily.Monospace)
        }
        bundles.forEach { bundle ->
            Card(Modifier.fillMaxWidth().clickable(enabled = bundle.manifest != null) { onPick(bundle) }) {
                Column(Modifier.padding(12.dp)) {
                    Text(bundle.name, style = MaterialTheme.typography.titleMedium)
                    val m = bundle.manifest
                    if (m != null) {
                        Text("${m.model.id} · ${m.quantization.scheme} · ${m.artifacts.joinToString { it.format }}")
                    } else {
                        Text(bundle.problem ?: "unreadable", color = MaterialTheme.colorScheme.error)
                    }
                }
            }
        }
        TextButton(onClick = onRefresh) { Text("Refresh") }
    }
}

@Composable
private fun BundleDetails(state: UiState, onFormat: (String) -> Unit, onLoad: () -> Unit) {
    val manifest = state.selected?.manifest ?: return
    val artifact = state.format?.let { manifest.artifact(it) }
    Column(Modifier.padding(16.dp).verticalScroll(rememberScrollState()), verticalArrangement = Arrangement.spacedBy(8.dp)) {
        val m = manifest.model
        Text("${m.id} (${m.family}, ${"%.1f".format(m.params / 1e6)} M parameters${if (m.layerSharing) ", layer-shared" else ""})")
        Text("Context ${manifest.contextLength} tokens · exported by phonekit ${manifest.phonekitVersion}")
        Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
            manifest.artifacts.forEach { a ->
                FilterChip(
                    selected = a.format == state.format,
                    enabled = a.format in ANDROID_FORMATS,
                    onClick = { onFormat(a.format) },
                    label = { Text("${a.format} ${mb(a.bytes)}") },
                )
            }
        }
        if (artifact == null) {
            Text("This bundle has no .pte or .onnx artifact; export it with --target android.", color = MaterialTheme.colorScheme.error)
            return@Column
        }
        val q = artifact.details?.quantization ?: manifest.quantization
        Text("Quantization: ${q.scheme} (weights ${q.weights}, activations ${q.activations})")
        Text("Runtime: ${artifact.runtime} · ${artifact.backend}")
        state.budget?.let { BudgetCard(it) }
        state.error?.let { Text(it, color = MaterialTheme.colorScheme.error) }
        when (state.phase) {
            Phase.VERIFYING -> {
                Text("Checking sha256 of ${artifact.files.size + manifest.tokenizer.files.size} files…")
                LinearProgressIndicator(progress = { state.verifyProgress }, modifier = Modifier.fillMaxWidth())
            }
            Phase.LOADING -> Row(verticalAlignment = Alignment.CenterVertically) {
                CircularProgressIndicator()
                Spacer(Modifier.width(12.dp))
                Text("Loading the model…")
            }
            else -> Button(onClick = onLoad, enabled = state.budget?.fit != Fit.OVER_AVAILABLE) { Text("Verify and load") }
        }
    }
}

@Composable
private fun BudgetCard(b: BudgetCheck) {
    val (label, color) = when (b.fit) {
        Fit.FITS -> "Fits this phone" to Color(0xFF2E7D32)
        Fit.OVER_BUDGET -> "Over budget: loading asks first" to Color(0xFFEF6C00)
        Fit.OVER_AVAILABLE -> "Refused: not enough free memory" to MaterialTheme.colorScheme.error
    }
    Card(Modifier.fillMaxWidth()) {
        Column(Modifier.padding(12.dp), verticalArrangement = Arrangement.spacedBy(4.dp)) {
            Text(label, color = color, style = MaterialTheme.typography.titleMedium)
            val what = if (b.estimated) "phonekit's estimate for ${b.format}" else "file size (no estimate in the bundle; export with --device)"
            Text("Needs ${mb(b.estimateBytes)} ($what)")
            Text("Budget ${mb(b.budgetBytes)} = ${pct(b.budgetFraction)} of ${mb(b.memory.totalBytes)} (ActivityManager totalMem)")
            Text("Free now ${mb(b.memory.availableBytes)}, low-memory threshold ${mb(b.memory.thresholdBytes)}")
            b.nearestProfile?.let { v ->
                Text("Exported verdict for the most similar profile, ${v.device}: ${if (v.fits) "fits" else "over"} (budget ${mb(v.budgetBytes)})")
            }
        }
    }
}

@Composable
private fun Chat(state: UiState, onSend: (String) -> Unit, onStop: () -> Unit) {
    var input by remember { mutableStateOf("") }
    val list = rememberLazyListState()
    val rows = state.messages.size + if (state.generating) 1 else 0
    LaunchedEffect(rows, state.streaming.length) { if (rows > 0) list.scrollToItem(rows - 1) }
    Column(Modifier.fillMaxSize()) {
        Text(
            buildString {
                append(state.engineLabel ?: "")
                state.liveTokensPerSecond?.takeIf { state.generating }?.let { append(" · %.1f tok/s".format(it)) }
                state.lastStats?.takeIf { !state.generating }?.let { s ->
                    append(" · decode %.1f tok/s".format(s.decodeTokensPerSecond))
                    s.prefillTokensPerSecond?.let { append(" · prefill %.1f tok/s".format(it)) }
                }
            },
            style = MaterialTheme.typography.labelMedium,
            modifier = Modifier.padding(horizontal = 16.dp, vertical = 4.dp),
        )
        state.templateNote?.let { Text(it, style = MaterialTheme.typography.labelSmall, modifier = Modifier.padding(horizontal = 16.dp)) }
        LazyColumn(Modifier.weight(1f).fillMaxWidth(), state = list, contentPadding = PaddingValues(16.dp)) {
            items(state.messages) { m -> Bubble(m.role, m.content) }
            if (state.generating) item { Bubble("assistant", state.streaming + "▍") }
        }
        state.error?.let { Text(it, color = MaterialTheme.colorScheme.error, modifier = Modifier.padding(horizontal = 16.dp)) }
        Row(Modifier.padding(8.dp), verticalAlignment = Alignment.CenterVertically) {
            OutlinedTextField(value = input, onValueChange = { input = it }, modifier = Modifier.weight(1f), placeholder = { Text("Message") })
            Spacer(Modifier.width(8.dp))
            if (state.generating) {
                Button(onClick = onStop) { Text("Stop") }
            } else {
                Button(onClick = { onSend(input); input = "" }, enabled = input.isNotBlank()) { Text("Send") }
            }
        }
    }
}

@Composable
private fun Bubble(role: String, text: String) {
    val mine = role == "user"
    Row(Modifier.fillMaxWidth().padding(vertical = 4.dp), horizontalArrangement = if (mine) Arrangement.End else Arrangement.Start) {
        Card(Modifier.fillMaxWidth(0.85f)) { Text(text, Modifier.padding(10.dp)) }
    }
}

private fun pct(fraction: Double?): String = "%.0f%%".format((fraction ?: 0.0) * 100)
