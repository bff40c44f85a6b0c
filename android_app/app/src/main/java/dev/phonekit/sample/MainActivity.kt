package dev.phonekit.sample

import android.os.Build
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.enableEdgeToEdge
import androidx.activity.viewModels
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.dynamicLightColorScheme
import androidx.compose.material3.lightColorScheme
import androidx.compose.ui.platform.LocalContext
import dev.phonekit.sample.ui.PhonekitChatApp

class MainActivity : ComponentActivity() {
    private val viewModel: ChatViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        enableEdgeToEdge()
        setContent {
            // Material You colours exist from Android 12; older phones get the default scheme.
            val colors = if (Build.VERSION.SDK_INT >= Build.VERSION_CODES.S) dynamicLightColorScheme(LocalContext.current) else lightColorScheme()
            MaterialTheme(colorScheme = colors) {
                PhonekitChatApp(viewModel)
            }
        }
    }

    override fun onResume() {
        super.onResume()
        // A bundle pushed while the app was in the background shows up on return.
        viewModel.refresh()
    }
}
